"""Closed-form fits of conv-norm chains: a stem or head conv with its BatchNorm, and the
MBConv / depthwise-separable blocks of (timm) EfficientNets, skip connection included.

A stage of a chain is conv -> BatchNorm -> activation. Its pre-activation output is
k_c * conv(x)_c + t_c per channel c once the norm is folded in, so it is linear in the
conv's trainable parameters (projected gamma, or a plain conv's weights) and a per-channel
offset: with frozen kernels (projected 1x1 convs left frozen) just in (k_c, t_c). Each
stage, fed the fused chain's own previous output, is fitted to its target by ridge least
squares; the solution is written back as conv parameters plus BatchNorm statistics and
affine parameters, so the fused module stays the same architecture. The targets of inner
stages are the models' mean pre-activations (kernels frozen or shared keep channel
identity there); the last stage's target comes from the level's matching."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import ProjectedConv2d
from strategies.fusion.fitting import _chunks, _conv_equations, _projected_conv_equations, ridge_solution

_BATCH_NORMS = nn.modules.batchnorm._BatchNorm
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU)


@dataclass
class Stage:
    conv: nn.Conv2d
    norm: nn.modules.batchnorm._BatchNorm
    act: nn.Module

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        return F.batch_norm(self.conv(x), n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre_activation(x))


@dataclass
class Chain:
    stages: list[Stage]
    skip: bool  # output = last stage + input

    @property
    def fixed_channels(self) -> bool:
        """The last conv's kernels are frozen (a projected net's 1x1 convs): its output
        channel c is the same filter in every model, so matching has nothing to permute."""
        return _trainable(self.stages[-1].conv) is None

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pre-activation output of every stage."""
        pre = []
        for stage in self.stages:
            pre.append(stage.pre_activation(x))
            x = stage.act(pre[-1])
        return pre

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for stage in self.stages:
            y = stage(y)
        return y + x if self.skip else y


def conv_norm_chain(module: nn.Module) -> Chain | None:
    """The module as a chain of conv-norm-act stages, or None when it is something else
    (an attention/SE module, a non-BatchNorm norm, branches other than an identity skip)."""
    children = list(module.children())
    stages, i = [], 0
    while i < len(children):
        child = children[i]
        if isinstance(child, nn.Conv2d):
            if i + 1 >= len(children) or not isinstance(children[i + 1], _BATCH_NORMS):
                return None
            norm = children[i + 1]
            if not norm.track_running_stats or not norm.affine:
                return None
            act = getattr(norm, "act", None)  # timm BatchNormAct2d carries its activation
            i += 2
            if act is None:
                act = nn.Identity()
                if i < len(children) and isinstance(children[i], _ACTIVATIONS):
                    act, i = children[i], i + 1
            elif not isinstance(getattr(norm, "drop", nn.Identity()), nn.Identity):
                return None
            stages.append(Stage(child, norm, act))
        elif isinstance(child, nn.Identity) or type(child).__name__ == "DropPath":  # eval: identity
            i += 1
        else:
            return None
    if not stages:
        return None
    skip = bool(getattr(module, "has_skip", False))
    if not isinstance(module, nn.Sequential) and not hasattr(module, "has_skip"):
        return None  # an unknown block: its forward may not be the chain
    return Chain(stages, skip)


@torch.no_grad()
def _frozen_equations(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor):
    """Frozen kernels: y_c = k_c * conv(x)_c + t_c, one 2-parameter regression per channel."""
    out = conv.out_channels
    gram = torch.zeros(out, 2, 2, dtype=x.dtype, device=x.device)
    rhs = torch.zeros(out, 2, 1, dtype=x.dtype, device=x.device)
    for part in _chunks(len(x), 64):
        u = conv(x[part]).transpose(0, 1).reshape(out, -1)  # (C, samples x positions)
        target = y[part].transpose(0, 1).reshape(out, -1)
        gram[:, 0, 0] += (u * u).sum(1)
        gram[:, 0, 1] += u.sum(1)
        gram[:, 1, 1] += u.shape[1]
        rhs[:, 0, 0] += (u * target).sum(1)
        rhs[:, 1, 0] += target.sum(1)
    gram[:, 1, 0] = gram[:, 0, 1]
    return gram, rhs


def _trainable(conv: nn.Conv2d) -> str | None:
    if isinstance(conv, ProjectedConv2d):
        return "projected" if conv.gamma.requires_grad else None
    if conv.weight.requires_grad:
        return "plain" if conv.groups == 1 else "unsupported"
    return None


@torch.no_grad()
def fit_stage(stage: Stage, x: torch.Tensor, target: torch.Tensor, ridge: float | None = None, seed: int = 0) -> bool:
    """Fit one stage's pre-activation output to `target`; False when its conv kind has no
    closed form here (a plain grouped conv)."""
    conv, norm = stage.conv, stage.norm
    kind = _trainable(conv)
    if kind == "unsupported":
        return False
    work = _double_copy(conv)
    # The stage now, in the solution's terms (norm folded in): the prior the fit shrinks to.
    scale_now, offset_now = folded_norm(norm)
    if kind is not None and conv.bias is not None:  # trainable convs are solved without their bias
        offset_now = offset_now + scale_now * conv.bias.double()
    if kind == "projected":
        old = conv.gamma.double()
        coefficients_now = scale_now[:, None] * old
        prior = torch.cat([coefficients_now, offset_now[:, None]], 1)[..., None]
        solution = ridge_solution(lambda a, b: _projected_conv_equations(work, a, b, bias=True), x, target, ridge,
                                  seed, prior, standardise=True)
        new, offset = solution[:, :-1, 0], solution[:, -1, 0]
    elif kind == "plain":
        old = conv.weight.double().flatten(1)
        coefficients_now = scale_now[:, None] * old
        prior = torch.cat([coefficients_now.T, offset_now[None]])
        solution = ridge_solution(lambda a, b: _conv_equations(work, a, b, bias=True), x, target, ridge, seed, prior, standardise=True)
        new, offset = solution[:-1].T, solution[-1]  # (C, d), (C,)
    else:
        coefficients_now = scale_now[:, None]
        prior = torch.stack([scale_now, offset_now], 1)[..., None]
        solution = ridge_solution(lambda a, b: _frozen_equations(work, a, b), x, target, ridge, seed, prior, standardise=True)
        new, offset = solution[:, :1, 0], solution[:, 1, 0]  # (C, 1) scales, (C,)
    # The stage's current output statistics give both the channels to keep as they are and
    # what such a channel still takes: its mean's shift to the target's.
    conv_mean, conv_var = _channel_stats(conv, x)
    mean_now = scale_now * conv_mean + norm.bias.double() - scale_now * norm.running_mean.double()
    shift = target.double().mean((0, 2, 3)) - mean_now
    new, offset = _keep_near_constant(new, offset, coefficients_now, offset_now + shift,
                                      spread_now=scale_now.abs() * conv_var.sqrt())
    if kind is None:
        scale = new[:, 0]
    if kind is not None:
        # Keep each channel's kernel norm (the scale SGD sees); the norm takes the rest.
        ratio = old.norm(dim=1) / new.norm(dim=1).clamp_min(1e-12)
        ratio = torch.where(new.norm(dim=1) > 1e-12, ratio, torch.ones_like(ratio))
        ratio = torch.where(ratio > 0, ratio, torch.ones_like(ratio))
        if kind == "projected":
            conv.gamma.copy_((new * ratio[:, None]).to(conv.gamma.dtype))
        else:
            conv.weight.copy_((new * ratio[:, None]).reshape_as(conv.weight).to(conv.weight.dtype))
        scale = 1.0 / ratio
    if kind is not None and conv.bias is not None:  # its part is in the offset now
        conv.bias.zero_()
    # BatchNorm statistics of the new conv output on x, then weight and bias such that
    # norm(conv(x)) = scale * conv(x) + offset.
    set_folded_norm(norm, scale, offset, *_channel_stats(conv, x))
    return True


def folded_norm(norm: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The BatchNorm in eval mode as scale * x + offset per channel (double)."""
    scale = norm.weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    return scale, norm.bias.double() - scale * norm.running_mean.double()


@torch.no_grad()
def set_folded_norm(norm: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor, offset: torch.Tensor,
                    mean: torch.Tensor, var: torch.Tensor) -> None:
    """Give the BatchNorm running statistics `mean` and `var`, and the weight and bias
    that make it scale * x + offset in eval mode."""
    norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
    norm.running_var.copy_(var.to(norm.running_var.dtype))
    norm.weight.copy_((scale * (var + norm.eps).sqrt()).to(norm.weight.dtype))
    norm.bias.copy_((offset + scale * mean).to(norm.bias.dtype))


@torch.no_grad()
def _channel_stats(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of conv(x) over samples and positions."""
    total, total_sq, count = 0.0, 0.0, 0
    for part in _chunks(len(x), 64):
        v = conv(x[part]).double()
        total, total_sq = total + v.sum((0, 2, 3)), total_sq + (v * v).sum((0, 2, 3))
        count += v.shape[0] * v.shape[2] * v.shape[3]
    mean = total / count
    return mean, (total_sq / count - mean**2).clamp_min(0)


NEAR_CONSTANT = 1e-3  # a channel whose output varies this little (vs the stage's median) keeps its gain


@torch.no_grad()
def _keep_near_constant(new: torch.Tensor, offset: torch.Tensor, prior: torch.Tensor, prior_offset: torch.Tensor,
                        spread_now: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A channel whose output is nearly constant on the proxy (`spread_now`), or whose fit
    is not finite, keeps its current coefficients (`prior`, the norm folded in) and only
    moves its mean (`prior_offset`). A fit would chase small target variations there with
    a huge gain: a colour-contrast stem channel of an ImageNet net gives ~0 on grey
    images, its gain grew to 1e5 over rounds, and local SGD from the fused model diverged.
    (Bounding every channel's gain instead, 4x or even 100x around the current stage or
    the models' own gains, cost zero-shot EfficientNet-Lite0 fusion 10-35 points: the
    fused model's inputs differ from each model's, so its gains legitimately differ.)"""
    near_constant = spread_now < NEAR_CONSTANT * spread_now.median().clamp_min(1e-12)
    keep = near_constant | ~torch.isfinite(new).all(1)
    return (torch.where(keep[:, None], prior.to(new.dtype), new),
            torch.where(keep, prior_offset.to(offset.dtype), offset))


def _double_copy(conv: nn.Conv2d) -> nn.Conv2d:
    return copy.deepcopy(conv).double()  # normal equations lose precision in float32


@torch.no_grad()
def fit_chain(chain: Chain, x: torch.Tensor, client_chains: list[Chain], client_inputs: list[torch.Tensor],
              last_target: torch.Tensor, ridge: float | None = None, seed: int = 0) -> bool:
    """Fit the fused chain stage by stage: inner stages to the models' mean pre-activations
    (computed on each model's own input), the last one to `last_target` (a pre-activation
    target, the skip already taken out). False, with nothing changed, when a stage has
    no closed form."""
    if any(_trainable(s.conv) == "unsupported" for s in chain.stages):
        return False
    client_x = list(client_inputs)
    for index, stage in enumerate(chain.stages):
        last = index == len(chain.stages) - 1
        if last:
            target = last_target
        else:
            pre = [c.stages[index].pre_activation(cx) for c, cx in zip(client_chains, client_x)]
            target = torch.stack(pre).mean(0)
            client_x = [c.stages[index].act(p) for c, p in zip(client_chains, pre)]
        fit_stage(stage, x, target, ridge, seed + index)
        if not last:
            x = stage(x)
    return True
