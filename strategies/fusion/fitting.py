"""Fitting one fused level to its targets: closed-form ridge least squares where the
probe's output is linear in its trainable parameters, gradient steps otherwise."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import nn

from models import ProjectedConv2d, ProjectedLinear


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float, prior: torch.Tensor | None = None,
           standardise: bool = False) -> torch.Tensor:
    """argmin |Zw - y|^2 + lambda s_j (w_j - prior_j)^2, batched over leading dims. s_j is
    the mean of G's diagonal for every feature, or with `standardise` each feature's own
    G_jj (ridge on standardised features: for a handful of features of very different
    scales, such as a conv response and a bias column; with many features it lets
    weights on rarely active ones grow, which destabilised multi-round training)."""
    diag = gram.diagonal(dim1=-2, dim2=-1)
    if standardise:  # a dead feature (all zeros) keeps its prior: a tiny penalty
        diag = diag.clamp_min(1e-9 * diag.mean(-1, keepdim=True).clamp_min(1e-12))
    else:
        diag = diag.mean(-1, keepdim=True).clamp_min(1e-12).expand_as(diag)
    penalty = torch.diag_embed(ridge * diag)
    if prior is not None:
        rhs = rhs + penalty @ prior
    return torch.linalg.solve(gram + penalty, rhs)


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The conv's input after the padding it applies itself, and the padding left to pass."""
    if getattr(conv, "same_padding", False) or type(conv).__name__ == "Conv2dSame":
        return pad_same(x, conv.kernel_size, conv.stride, conv.dilation), (0, 0)
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    return x, conv.padding


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@torch.no_grad()
def _linear_equations(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor):
    z = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1) if layer.bias is not None else x
    return z.T @ z, z.T @ y  # shared by all outputs: (d, d), (d, out)


@torch.no_grad()
def _read_linear(layer: nn.Linear) -> torch.Tensor:
    parts = [layer.weight.T] + ([layer.bias[None]] if layer.bias is not None else [])
    return torch.cat(parts).double()


@torch.no_grad()
def _write_linear(layer: nn.Linear, solution: torch.Tensor) -> None:
    layer.weight.copy_(solution[: layer.in_features].T)
    if layer.bias is not None:
        layer.bias.copy_(solution[-1])


@torch.no_grad()
def _projected_linear_equations(layer: ProjectedLinear, x: torch.Tensor, y: torch.Tensor):
    # y_c = sum_i gamma[c, i] * (W[c, i] x_i) + b_c: one small regression per output c.
    out, d = layer.weight.shape
    bias = layer.bias is not None
    gram = torch.zeros(out, d + bias, d + bias, dtype=x.dtype, device=x.device)
    rhs = torch.zeros(out, d + bias, dtype=x.dtype, device=x.device)
    for part in _chunks(len(x), 256):
        z = x[part, None, :] * layer.weight[None]  # (b, out, d)
        if bias:
            z = torch.cat([z, torch.ones(*z.shape[:2], 1, dtype=z.dtype, device=z.device)], 2)
        gram += torch.einsum("bci,bcj->cij", z, z)
        rhs += torch.einsum("bci,bc->ci", z, y[part])
    return gram, rhs[..., None]  # one system per output: (out, d, d), (out, d, 1)


@torch.no_grad()
def _read_per_output(layer: nn.Module) -> torch.Tensor:
    parts = [layer.gamma] + ([layer.bias[:, None]] if layer.bias is not None else [])
    return torch.cat(parts, 1).double()[..., None]


@torch.no_grad()
def _write_per_output(layer: nn.Module, solution: torch.Tensor) -> None:
    """gamma[c] (and bias[c]) from one solution column per output channel."""
    d = layer.gamma.shape[1]
    layer.gamma.copy_(solution[:, :d, 0])
    if layer.bias is not None:
        layer.bias.copy_(solution[:, d, 0])


@torch.no_grad()
def _conv_equations(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, bias: bool | None = None):
    """Plain conv, groups == 1: regression on unfolded input patches."""
    x, padding = _padded(conv, x)
    bias = conv.bias is not None if bias is None else bias
    d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    gram = torch.zeros(d + bias, d + bias, dtype=x.dtype, device=x.device)
    rhs = torch.zeros(d + bias, conv.out_channels, dtype=x.dtype, device=x.device)
    for part in _chunks(len(x), 64):
        patches = F.unfold(x[part], conv.kernel_size, conv.dilation, padding, conv.stride)  # (b, d, P)
        z = patches.transpose(1, 2).reshape(-1, d)
        if bias:
            z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)], 1)
        target = y[part].flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
        gram += z.T @ z
        rhs += z.T @ target
    return gram, rhs


@torch.no_grad()
def _read_conv(conv: nn.Conv2d) -> torch.Tensor:
    parts = [conv.weight.flatten(1).T] + ([conv.bias[None]] if conv.bias is not None else [])
    return torch.cat(parts).double()


@torch.no_grad()
def _write_conv(conv: nn.Conv2d, solution: torch.Tensor) -> None:
    d = conv.weight[0].numel()
    conv.weight.copy_(solution[:d].T.reshape_as(conv.weight))
    if conv.bias is not None:
        conv.bias.copy_(solution[d])


@torch.no_grad()
def _projected_conv_equations(conv: ProjectedConv2d, x: torch.Tensor, y: torch.Tensor, bias: bool | None = None):
    """y_c = sum_i gamma[c, i] * conv(x_i, W[c, i]) + b_c: per output channel, a
    regression on the responses of its frozen per-input-channel kernels, computed for
    all (i, c) pairs of all groups in one conv with one group per input channel.
    `bias` adds the b_c column (default: when the conv has a bias)."""
    # On a 1x1 map only the kernel's centre meets data (ProjectedConv2d.forward): a product
    # per channel, where the double-precision depthwise conv took 2 of the 12 s of fusing
    # three EfficientNet-Lite0s at 32 px.
    centre = conv.centre if x.shape[-2:] == (1, 1) else None
    if centre is None:
        x, padding = _padded(conv, x)
    groups, out = conv.groups, conv.out_channels
    in_g, out_g = conv.in_channels // groups, out // groups
    bias = conv.bias is not None if bias is None else bias
    # Filter (j, c) of input channel j = g * in_g + i is W[g * out_g + c, i].
    weight = conv.weight.reshape(groups, out_g, in_g, *conv.kernel_size).transpose(1, 2)
    weight = weight.reshape(conv.in_channels * out_g, 1, *conv.kernel_size).to(x.dtype)
    gram = torch.zeros(out, in_g + bias, in_g + bias, dtype=x.dtype, device=x.device)
    rhs = torch.zeros(out, in_g + bias, dtype=x.dtype, device=x.device)
    for part in _chunks(len(x), 32):
        if centre is not None:
            taps = weight[:, 0, centre[0], centre[1]].view(1, -1, 1, 1)
            responses = x[part].repeat_interleave(out_g, 1) * taps
        else:
            responses = F.conv2d(x[part], weight, None, conv.stride, padding, conv.dilation, conv.in_channels)
        b = responses.shape[0]
        # (b, groups, in_g, out_g, P) -> (b, in_g, out, P), output channel g * out_g + c.
        z = responses.reshape(b, groups, in_g, out_g, -1).transpose(1, 2).reshape(b, in_g, out, -1)
        if bias:
            z = torch.cat([z, torch.ones_like(z[:, :1])], 1)
        gram += torch.einsum("bicp,bjcp->cij", z, z)
        rhs += torch.einsum("bicp,bcp->ci", z, y[part].flatten(2))
    return gram, rhs[..., None]


RIDGE_GRID = (1e-2, 1e-1, 1.0, 10.0)


def _solver_for(probe: nn.Module):
    if isinstance(probe, ProjectedConv2d):
        return _projected_conv_equations, _write_per_output, _read_per_output
    if isinstance(probe, ProjectedLinear):
        return _projected_linear_equations, _write_per_output, _read_per_output
    if isinstance(probe, nn.Linear):
        return _linear_equations, _write_linear, _read_linear
    if isinstance(probe, nn.Conv2d) and probe.groups == 1:
        return _conv_equations, _write_conv, _read_conv
    return None


def ridge_solution(equations, x: torch.Tensor, y: torch.Tensor, ridge: float | None = None,
                   seed: int = 0, prior: torch.Tensor | None = None, standardise: bool = False) -> torch.Tensor:
    """Solve the ridge least squares whose normal equations `equations(x, y)` returns, in
    float64, shrunk towards `prior` (the level's current parameters: in a federation the
    fused model starts as the clients' average, and the fit should move it only as far
    as the proxy data supports; towards zero when None). The ridge strength (relative to the normal matrix's mean diagonal) is chosen
    from RIDGE_GRID by the error on a held-out fifth of the samples, computed from that
    part's normal equations, then the fit is redone on all samples. With fewer samples
    than features, a tiny ridge would interpolate the proxy set."""
    x, y = x.double(), y.double()
    grid = RIDGE_GRID if ridge is None else (ridge,)
    if len(grid) > 1 and len(x) >= 10:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        held, train = order[: len(x) // 5], order[len(x) // 5:]
        gram_t, rhs_t = equations(x[train], y[train])
        gram_h, rhs_h = equations(x[held], y[held])

        def held_error(lam: float) -> float:
            w = _solve(gram_t, rhs_t, lam, prior, standardise)
            return float((w * (gram_h @ w)).sum() - 2 * (w * rhs_h).sum())

        return _solve(gram_t + gram_h, rhs_t + rhs_h, min(grid, key=held_error), prior, standardise)
    gram, rhs = equations(x, y)
    return _solve(gram, rhs, grid[0], prior, standardise)


def closed_form_fit(probe: nn.Module, x: torch.Tensor, y: torch.Tensor, ridge: float | None = None,
                    seed: int = 0) -> bool:
    """Fit `probe` so that probe(x) ~ y by ridge least squares (`ridge_solution`); False
    when its output is not linear in its trainable parameters in a way handled here."""
    solver = _solver_for(probe)
    if solver is None:
        return False
    equations, write, read = solver
    work = copy.deepcopy(probe).double()  # normal equations lose precision in float32
    write(work, ridge_solution(lambda a, b: equations(work, a, b), x, y, ridge, seed, prior=read(work)))
    with torch.no_grad():
        for name, param in probe.named_parameters():
            param.copy_(dict(work.named_parameters())[name].to(param.dtype))
    return True


@dataclass
class GradientFit:
    steps: int  # steps taken before stopping
    best_step: int  # 0: the starting parameters were kept
    loss_start: float  # held-out loss of the starting parameters
    loss_best: float  # and of the kept ones


def early_stopped_adam(params: list[torch.nn.Parameter], batch_loss: Callable[[int], torch.Tensor],
                       held_loss: Callable[[], float], steps: int, lr: float, patience: int) -> GradientFit:
    """Adam on batch_loss(step) for at most `steps` steps, checked every 10 steps by
    held_loss() and stopped after `patience` checks without a lower one; the best
    parameters seen (the starting ones included) are kept."""
    if not params:
        return GradientFit(0, 0, float("nan"), float("nan"))
    start = best = held_loss()
    best_state, best_step, waited, taken = [p.detach().clone() for p in params], 0, 0, 0
    optimizer = torch.optim.Adam(params, lr=lr)
    while taken < steps and waited < patience:
        optimizer.zero_grad()
        batch_loss(taken).backward()
        optimizer.step()
        taken += 1
        if taken % 10 == 0:
            loss = held_loss()
            if loss < best - 1e-9:
                best, best_state, best_step, waited = loss, [p.detach().clone() for p in params], taken, 0
            else:
                waited += 1
    with torch.no_grad():
        for p, kept in zip(params, best_state):
            p.copy_(kept)
    return GradientFit(taken, best_step, start, best)


def gradient_fit(forward, params: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                 steps: int = 100, lr: float = 3e-3, seed: int = 0, patience: int = 2) -> GradientFit:
    """Adam on MSE(forward(x), y) with early stopping on a held-out fifth of the proxy
    samples (checked every 10 steps, stopped after `patience` checks without a better
    loss); the best parameters seen (the starting ones included) are kept. The module
    stays in eval mode: its BatchNorm statistics are those it will run with."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = max(1, len(x) // 5) if len(x) >= 5 else 0
    held, train = order[:cut], order[cut:]

    def held_loss() -> float:
        with torch.no_grad():
            idx = held if len(held) else train
            return F.mse_loss(forward(x[idx]), y[idx]).item()

    def batch_loss(step: int) -> torch.Tensor:
        batch = train[torch.randint(len(train), (min(128, len(train)),),
                                    generator=torch.Generator().manual_seed(seed + step))]
        return F.mse_loss(forward(x[batch]), y[batch])

    return early_stopped_adam(params, batch_loss, held_loss, steps, lr, patience)
