"""Neuron-centric fusion with attribution-weighted matching: plain PyTorch, no flwr."""

from strategies.fusion.attribution import METHODS, neuron_attributions
from strategies.fusion.engine import (
    HEAD_TARGETS,
    FusionError,
    average_models,
    fuse,
    head_targets,
    reestimate_batchnorm,
    restate_norm_statistics,
)

__all__ = ["HEAD_TARGETS", "METHODS", "FusionError", "average_models", "fuse", "head_targets", "neuron_attributions",
           "reestimate_batchnorm", "restate_norm_statistics"]
