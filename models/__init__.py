"""Backbones, the model registry and the exchanged state. No flwr import."""

from models.registry import ModelError, ModelInfo, create, info, names, register
from models.state import exchanged_names, exchanged_state, load_exchanged_state, state_bytes

__all__ = [
    "ModelError", "ModelInfo", "create", "exchanged_names", "exchanged_state", "info",
    "load_exchanged_state", "names", "register", "state_bytes",
]
