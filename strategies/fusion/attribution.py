"""Per-level neuron importance on labelled data (run where the labels are: the client)."""

from __future__ import annotations

import torch
from torch import nn

from models import levels

METHODS = ("uniform", "gradxact", "conductance")


def neuron_attributions(model: nn.Module, loader, method: str = "gradxact", max_samples: int = 256) -> list[torch.Tensor]:
    """One non-negative score per neuron (channel) of every level: the mean absolute
    attribution of the level's probe output to the true class, via captum. `loader`
    yields (inputs, labels); at most `max_samples` samples are used."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution '{method}': choose one of {', '.join(METHODS)}")
    level_list = levels(model)
    if method == "uniform":
        return [torch.ones(level.width) for level in level_list]
    from captum.attr import LayerConductance, LayerGradientXActivation

    inputs, labels = [], []
    for x, y in loader:
        inputs.append(x)
        labels.append(y)
        if sum(len(b) for b in inputs) >= max_samples:
            break
    x, y = torch.cat(inputs)[:max_samples], torch.cat(labels)[:max_samples]
    was_training = model.training
    model.eval()
    owned = {id(m) for m in model.modules()}
    scores = []
    for level in level_list:
        layer = level.probe
        while id(layer) not in owned:  # a wrapper made by levels() (stem = conv + norm): hook its last part
            layer = list(layer.children())[-1]
        if method == "gradxact":
            attr = LayerGradientXActivation(model, layer).attribute(x, target=y)
        else:
            attr = LayerConductance(model, layer).attribute(x, target=y, n_steps=16, internal_batch_size=64)
        scores.append(attr.detach().abs().transpose(0, 1).reshape(level.width, -1).mean(1).float())
    model.train(was_training)
    return scores
