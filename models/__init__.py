"""Backbones, the model registry, projection and the exchanged state. No flwr import."""

from models.levels import Level, levels
from models.projection import (
    POINTWISE_POLICIES,
    ProjectedConv2d,
    ProjectedLinear,
    fold,
    is_projected,
    project,
)
from models.registry import ModelError, ModelInfo, create, info, names, register
from models.report import format_report, parameter_report
from models.state import (
    NORM_STATISTICS,
    exchanged_names,
    exchanged_state,
    load_exchanged_state,
    state_bytes,
    with_state,
)

__all__ = [
    "NORM_STATISTICS", "POINTWISE_POLICIES", "Level", "ModelError", "ModelInfo", "ProjectedConv2d", "ProjectedLinear", "create",
    "exchanged_names", "exchanged_state", "fold", "format_report", "info", "is_projected",
    "levels", "load_exchanged_state", "names", "parameter_report", "project", "register", "state_bytes",
    "with_state",
]
