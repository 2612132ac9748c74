"""One place where model names resolve: `create(name, num_classes, pretrained)`.

Names: `simple-cnn`, `efficientnet-lite0`, and `timm:NAME` for any timm model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from models.backbones import efficientnet_lite0, timm_model
from models.simple_cnn import simple_cnn


class ModelError(ValueError):
    """An unknown model name or unusable weights; the message says the fix."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[..., nn.Module]  # (num_classes, pretrained, weights) -> model
    input_channels: int
    input_size: int
    # None: normalise with the dataset's own statistics (models trained from scratch).
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    pretrained: bool = False  # has pretrained weights, so projection is its default


_REGISTRY: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> ModelInfo:
    _REGISTRY[info.name] = info
    return info


def names() -> list[str]:
    return sorted(_REGISTRY) + ["timm:NAME"]


def info(name: str) -> ModelInfo:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_info(name)
    raise ModelError(f"unknown model '{name}': choose one of {', '.join(names())}")


def _timm_info(name: str) -> ModelInfo:
    import timm
    from timm.models import get_pretrained_cfg

    arch = name.removeprefix("timm:")
    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model '{arch}': see timm.list_models()")
    cfg = get_pretrained_cfg(arch)
    size = cfg.input_size[-1] if cfg else 224
    norm = (tuple(cfg.mean), tuple(cfg.std)) if cfg else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return ModelInfo(name, lambda classes, pretrained, weights=None: timm_model(arch, classes, pretrained, weights),
                     3, size, norm, pretrained=True)


def create(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None) -> nn.Module:
    """Build a registered model with a `num_classes` head. `pretrained` is ignored by
    models that have no pretrained weights (simple-cnn); `weights` is a local checkpoint
    for timm models."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    model_info = info(name)
    try:
        return model_info.build(num_classes, pretrained, weights)
    except (OSError, RuntimeError) as err:
        if weights or not pretrained or not name.startswith("timm:"):
            raise
        raise ModelError(
            f"could not load pretrained weights for {name} ({type(err).__name__}): "
            "pass a local checkpoint with --weights PATH, or --no-pretrained"
        ) from err


register(ModelInfo("simple-cnn", lambda classes, pretrained, weights=None: simple_cnn(classes), 1, 28))
register(ModelInfo(
    "efficientnet-lite0", lambda classes, pretrained, weights=None: efficientnet_lite0(classes, pretrained),
    3, 224, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), pretrained=True,  # TF-ported weights: mean = std = 0.5
))
