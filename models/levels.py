"""Level decomposition: a model as an ordered list of levels, each a sub-module with a
known output width, whose composition is the model (in eval mode).

Levels share their modules with the model (no copies), so fitting a level changes the
model. Skip connections stay inside their level (a residual or MBConv block)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from models.projection import NORM_LAYERS


@dataclass
class Level:
    """`probe` is the sub-module whose output defines the level's neurons: the leading
    Conv/Linear of a layer level (its pre-activation output is linear in its weights),
    or the whole block. `prefix` maps the level's input to the probe's input."""

    name: str
    module: nn.Module
    width: int  # output channels (convs, blocks) or features (linear layers)
    kind: str  # "layer", "stem", "block", "head"
    probe: nn.Module | None = None
    prefix: nn.Module | None = None

    def __post_init__(self):
        if self.probe is None:
            self.probe = self.module

    def __call__(self, x):
        return self.module(x)

    def probe_input(self, x):
        return self.prefix(x) if self.prefix is not None else x


def output_width(module: nn.Module) -> int:
    """Channels a level outputs: its last norm's width, else its last conv/linear's."""
    width = None
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            width = m.out_channels
        elif isinstance(m, nn.Linear):
            width = m.out_features
        elif isinstance(m, NORM_LAYERS) and getattr(m, "num_features", None):
            width = m.num_features
    if width is None:
        raise ValueError(f"level {type(module).__name__} has no conv, linear or norm layer")
    return width


def _sequential_levels(model: nn.Sequential) -> list[Level]:
    """One level per Linear or Conv, with the norm, activation and pooling layers that
    follow it. A Flatten opens the next level (it belongs to the Linear that needs it),
    so every level but the head outputs channels; layers before the first Linear or
    Conv join the first level."""
    groups: list[list[tuple[str, nn.Module]]] = []
    pending: list[tuple[str, nn.Module]] = []
    for name, layer in model.named_children():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            groups.append(pending + [(name, layer)])
            pending = []
        elif groups and not isinstance(layer, nn.Flatten) and not pending:
            groups[-1].append((name, layer))
        else:
            pending.append((name, layer))
    if not groups:
        raise ValueError("the Sequential has no Linear or Conv2d layer")
    groups[-1].extend(pending)
    levels = []
    for i, group in enumerate(groups):
        layers = [layer for _, layer in group]
        lead = next(j for j, layer in enumerate(layers) if isinstance(layer, (nn.Conv2d, nn.Linear)))
        module = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        names = [n for n, _ in group]
        levels.append(Level(
            f"{names[0]}-{names[-1]}" if len(names) > 1 else names[0], module, output_width(module),
            "head" if i == len(groups) - 1 else "layer", probe=layers[lead],
            prefix=nn.Sequential(*layers[:lead]) if lead else None,
        ))
    return levels


def _timm_efficientnet_levels(model: nn.Module) -> list[Level]:
    levels = [Level("stem", nn.Sequential(model.conv_stem, model.bn1), output_width(model.bn1), "stem")]
    for s, stage in enumerate(model.blocks):
        for b, block in enumerate(stage):
            levels.append(Level(f"blocks.{s}.{b}", block, output_width(block), "block"))
    levels.append(Level("conv_head", nn.Sequential(model.conv_head, model.bn2), output_width(model.bn2), "block"))
    levels.append(Level("head", nn.Sequential(model.global_pool, model.classifier),
                        output_width(model.classifier), "head", probe=model.classifier, prefix=model.global_pool))
    return levels


def _resnet_levels(model: nn.Module) -> list[Level]:
    act = getattr(model, "act1", None) or getattr(model, "relu")
    levels = [Level("stem", nn.Sequential(model.conv1, model.bn1, act, model.maxpool), output_width(model.bn1), "stem")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for b, block in enumerate(getattr(model, stage)):
            levels.append(Level(f"{stage}.{b}", block, output_width(block), "block"))
    pool = model.global_pool if hasattr(model, "global_pool") else nn.Sequential(model.avgpool, nn.Flatten(1))
    levels.append(Level("head", nn.Sequential(pool, model.fc), output_width(model.fc), "head", probe=model.fc, prefix=pool))
    return levels


_DECOMPOSERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], list[Level]]]] = [
    (lambda m: all(hasattr(m, a) for a in ("conv_stem", "blocks", "conv_head", "classifier")), _timm_efficientnet_levels),
    (lambda m: all(hasattr(m, a) for a in ("conv1", "layer1", "layer4", "fc")), _resnet_levels),
    (lambda m: isinstance(m, nn.Sequential), _sequential_levels),
]


def levels(model: nn.Module) -> list[Level]:
    """The model's levels in order; running them one after another reproduces the
    model's output (eval mode: dropout between levels is not replayed)."""
    for matches, decompose in _DECOMPOSERS:
        if matches(model):
            return decompose(model)
    raise ValueError(
        f"no level decomposition for {type(model).__name__}: supported are nn.Sequential "
        "nets, timm EfficientNets and torchvision/timm ResNets"
    )
