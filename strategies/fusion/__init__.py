"""Neuron-centric fusion with attribution-weighted matching: plain PyTorch, no flwr."""

from strategies.fusion.attribution import METHODS, neuron_attributions
from strategies.fusion.engine import FusionError, average_models, fuse, reestimate_batchnorm

__all__ = ["METHODS", "FusionError", "average_models", "fuse", "neuron_attributions", "reestimate_batchnorm"]
