"""Per-batch conversion of uint8 images into what a model expects."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class InputSpec:
    channels: int  # 1 for grey models, 3 for ImageNet backbones
    resolution: int  # square side in pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]


def to_model_input(images: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (B, H, W) or (B, H, W, C) -> normalised float (B, spec.channels, R, R)."""
    x = images.to(torch.float32).div_(255.0)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != spec.channels:
        # grey -> RGB repeats the channel; RGB -> grey averages.
        x = x.expand(-1, spec.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
    if x.shape[-1] != spec.resolution or x.shape[-2] != spec.resolution:
        x = F.interpolate(x, size=(spec.resolution, spec.resolution), mode="bilinear", align_corners=False)
    mean = torch.tensor(_per_channel(spec.mean, spec.channels), device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(_per_channel(spec.std, spec.channels), device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    if len(values) == channels:
        return list(values)
    if len(values) == 1:
        return list(values) * channels
    return [sum(values) / len(values)] * channels  # RGB stats for a grey model
