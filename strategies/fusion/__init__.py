"""Neuron-centric fusion with attribution-weighted matching: plain PyTorch, no flwr."""

from strategies.fusion.attribution import METHODS, neuron_attributions
from strategies.fusion.engine import FusionError, fuse, reestimate_batchnorm

__all__ = ["METHODS", "FusionError", "fuse", "neuron_attributions", "reestimate_batchnorm"]
