"""Model projection: freeze pretrained kernels, learn one scale per (output, input) channel.

A projected conv computes conv(x, W * gamma[:, :, None, None]) in one call, W frozen
(a buffer) and gamma[o, i/groups] trainable, initialised to 1, so the projected model
starts as exactly the pretrained one. `fold` turns it back into plain layers."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

POINTWISE_POLICIES = ("project", "freeze", "train")
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
               "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class ProjectedConv2d(nn.Conv2d):
    """A Conv2d whose weight is a frozen buffer scaled by trainable gamma[o, i/groups].

    Subclasses nn.Conv2d so that code that looks for convs still finds it; grouped and
    depthwise convs get gamma[o, i/groups]; timm's TF-'same' padding is kept."""

    def __init__(self, conv: nn.Conv2d):
        nn.Module.__init__(self)  # not Conv2d.__init__: it would allocate a new weight
        for attr in _CONV_ATTRS:
            setattr(self, attr, getattr(conv, attr))
        weight = conv.weight.detach().clone()
        self.register_buffer("weight", weight)
        self.gamma = nn.Parameter(torch.ones(weight.shape[:2], dtype=weight.dtype, device=weight.device))
        bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.register_parameter("bias", bias)
        self.same_padding = isinstance(conv, Conv2dSame)
        # One input channel per group (depthwise): gamma[o, 0] scales output channel o as a
        # whole, so it is applied after the frozen kernel's conv, and autograd never asks
        # for the kernel's gradient. oneDNN's depthwise weight gradient on the tiny maps of
        # a backbone's last stages (1x1 and 2x2 at 32 px) took 3/4 of a training step.
        self.scales_output = self.in_channels == self.groups
        self.centre = _centre_tap(self) if self.scales_output else None

    def projected_weight(self) -> torch.Tensor:
        return self.weight * self.gamma[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centre is not None and x.shape[-2:] == (1, 1):
            # On a 1x1 map 'same' padding leaves the kernel's centre as the only tap that
            # meets data: a product per channel, where oneDNN's depthwise conv took 0.6 s
            # on a batch of 500 (1152 channels, 5x5).
            scale = self.weight[:, 0, self.centre[0], self.centre[1]] * self.gamma[:, 0]
            source = x.repeat_interleave(self.out_channels // self.in_channels, 1)
            out = source * scale.view(1, -1, 1, 1)
            return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)
        if self.same_padding:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        if not self.scales_output:
            return self._conv_forward(x, self.projected_weight(), self.bias)
        out = self._conv_forward(x, self.weight, None) * self.gamma.view(1, -1, 1, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def fold(self) -> nn.Conv2d:
        common = dict(stride=self.stride, dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
                      device=self.weight.device, dtype=self.weight.dtype)
        if self.same_padding:
            conv = Conv2dSame(self.in_channels, self.out_channels, self.kernel_size, **common)
        else:
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, padding=self.padding,
                             padding_mode=self.padding_mode, **common)
        with torch.no_grad():
            conv.weight.copy_(self.projected_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return super().extra_repr() + ", projected" + (", same" if self.same_padding else "")


def _centre_tap(conv: ProjectedConv2d) -> tuple[int, int] | None:
    """The kernel's centre when the conv pads 'same' with zeros (timm's TF padding, or
    dilation x (k - 1) / 2 on each side of an odd kernel); else None."""
    odd = all(k % 2 == 1 for k in conv.kernel_size)
    symmetric = conv.same_padding or (isinstance(conv.padding, tuple) and all(
        p == d * (k - 1) // 2 for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size)))
    if not (odd and symmetric and conv.padding_mode == "zeros"):
        return None
    return conv.kernel_size[0] // 2, conv.kernel_size[1] // 2


class ProjectedLinear(nn.Linear):
    """The 1x1 case: frozen W[o, i] scaled by trainable gamma[o, i]."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().clone()
        self.register_buffer("weight", weight)
        self.gamma = nn.Parameter(torch.ones_like(weight))
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.register_parameter("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gamma, self.bias)

    def fold(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.gamma)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


_PROJECTORS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.Conv2d: ProjectedConv2d,
    nn.Linear: ProjectedLinear,
}
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def head_name(model: nn.Module) -> str:
    """The classifier: timm's get_classifier(), else the last Linear."""
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for name, module in model.named_modules():
            if module is classifier:
                return name
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot find the classifier head: the model has no Linear layer")
    return linears[-1]


def _is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return tuple(module.kernel_size) == (1, 1) and module.groups == 1


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def project(model: nn.Module, pointwise: str = "freeze", inplace: bool = False) -> nn.Module:
    """Replace every conv (and hidden Linear) outside the head by its projected form.

    `pointwise` decides for 1x1 convs and hidden Linears, where gamma would have as many
    entries as W: "project" them anyway, "freeze" them, or "train" them in full. Norm
    affine parameters, projected biases and the head stay trainable; all else is frozen."""
    if pointwise not in POINTWISE_POLICIES:
        raise ValueError(f"unknown pointwise policy '{pointwise}': choose one of {', '.join(POINTWISE_POLICIES)}")
    if not inplace:
        model = copy.deepcopy(model)
    head = head_name(model)
    trainable_modules: list[nn.Module] = []
    for name, module in list(model.named_modules()):
        kind = next((k for k in _PROJECTORS if isinstance(module, k)), None)
        if kind is None or isinstance(module, (ProjectedConv2d, ProjectedLinear)):
            continue
        if name == head or name.startswith(head + "."):
            continue
        if _is_pointwise(module) and pointwise != "project":
            if pointwise == "train":
                trainable_modules.append(module)
            continue
        _set_module(model, name, _PROJECTORS[kind](module))
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, (ProjectedConv2d, ProjectedLinear, *NORM_LAYERS)):
            for param in module.parameters(recurse=False):
                param.requires_grad_(True)
    for module in trainable_modules + [model.get_submodule(head)]:
        for param in module.parameters():
            param.requires_grad_(True)
    return model


def is_projected(model: nn.Module) -> bool:
    return any(isinstance(m, (ProjectedConv2d, ProjectedLinear)) for m in model.modules())


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Plain layers computing the same function; every parameter trainable again."""
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (ProjectedConv2d, ProjectedLinear)):
            _set_module(model, name, module.fold())
    for param in model.parameters():
        param.requires_grad_(True)
    return model
