"""One place where model names resolve: `create(name, num_classes, pretrained)`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from models.simple_cnn import simple_cnn


class ModelError(ValueError):
    """An unknown model name or unusable weights; the message says the fix."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    build: Callable[[int, bool], nn.Module]  # (num_classes, pretrained) -> model
    input_channels: int
    input_size: int
    # None: normalise with the dataset's own statistics (models trained from scratch).
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    pretrained_by_default: bool = False


_REGISTRY: dict[str, ModelInfo] = {}


def register(info: ModelInfo) -> ModelInfo:
    _REGISTRY[info.name] = info
    return info


def names() -> list[str]:
    return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise ModelError(f"unknown model '{name}': choose one of {', '.join(names())}")


def create(name: str, num_classes: int, pretrained: bool = True) -> nn.Module:
    """Build a registered model with a `num_classes` head. `pretrained` is ignored by
    models that have no pretrained weights (simple-cnn)."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be at least 1, got {num_classes}")
    return info(name).build(num_classes, pretrained)


register(ModelInfo("simple-cnn", lambda classes, pretrained: simple_cnn(classes), 1, 28))
