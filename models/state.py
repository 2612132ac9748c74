"""What travels between clients and server: the trainable tensors, by name.

Norm-layer running statistics travel with them: they are re-estimated by local
training, and a global model evaluated with stale statistics would be wrong."""

from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

# Norm layers' running statistics: exchanged with the weights, but averages, not weights.
NORM_STATISTICS = ("running_mean", "running_var")


def exchanged_names(model: nn.Module) -> list[str]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = []
    for name, _ in model.state_dict(keep_vars=True).items():
        if name in trainable or name.endswith(NORM_STATISTICS):
            names.append(name)
    return names


def exchanged_state(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    state = model.state_dict()
    return OrderedDict((n, state[n].detach().cpu().numpy().copy()) for n in exchanged_names(model))


def load_exchanged_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy received tensors into the model; every exchanged name must be present with
    its shape, so a mismatched update fails loudly instead of half-loading."""
    expected = exchanged_names(model)
    missing, extra = set(expected) - set(arrays), set(arrays) - set(expected)
    if missing or extra:
        raise ValueError(f"state mismatch: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
    state = model.state_dict()
    with torch.no_grad():
        for name in expected:
            value = torch.as_tensor(np.asarray(arrays[name]))
            if value.shape != state[name].shape:
                raise ValueError(f"state mismatch: {name} has shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
            state[name].copy_(value)


def with_state(template: nn.Module, arrays) -> nn.Module:
    """A copy of `template` holding the exchanged tensors `arrays` (numpy arrays, or
    anything with `.numpy()` such as Flower's ArrayRecord values)."""
    model = copy.deepcopy(template)
    load_exchanged_state(model, {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in arrays.items()})
    return model


def state_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
