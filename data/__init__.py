"""Datasets (offline first), non-IID partitioning and batch loading. No flwr import."""

from data.datasets import DatasetError, ImageDataset, load, names, register
from data.federation import Federation, FederationSpec, build_federation
from data.loader import BatchLoader
from data.partition import (
    SCHEMES,
    PartitionError,
    check_partition_args,
    class_histogram,
    hold_out,
    label_skew,
    partition,
)
from data.transforms import InputSpec, to_model_input

__all__ = [
    "SCHEMES", "BatchLoader", "DatasetError", "Federation", "FederationSpec", "ImageDataset",
    "InputSpec", "PartitionError", "build_federation", "check_partition_args", "class_histogram",
    "hold_out", "label_skew", "load", "names", "partition", "register", "to_model_input",
]
