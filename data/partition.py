"""Non-IID partitioning on flwr-datasets partitioners, plus the server's proxy hold-out.

The partitioners work on an in-memory `datasets.Dataset` holding only the label column
and each row's index into the training set, so no hub access and no image copies.
"""

from __future__ import annotations

from typing import Callable

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)
from sklearn.model_selection import train_test_split

from data.datasets import DatasetError

SCHEMES = ("iid", "dirichlet", "pathological")


class PartitionError(ValueError):
    """Partition settings that cannot work; the message says the fix."""


def check_partition_args(
    scheme: str, num_samples: int, num_classes: int, num_clients: int,
    alpha: float | None = None, classes_per_client: int | None = None,
) -> None:
    """Raise PartitionError for settings that cannot produce a partition."""
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition '{scheme}': choose one of {', '.join(SCHEMES)}")
    if num_clients < 1:
        raise PartitionError(f"--clients must be at least 1, got {num_clients}")
    if num_clients > num_samples:
        raise PartitionError(
            f"--clients {num_clients} is more than the {num_samples} training samples "
            "left for clients: use fewer clients or a smaller --proxy-size"
        )
    if scheme == "dirichlet":
        if alpha is None or not np.isfinite(alpha) or alpha <= 0:
            raise PartitionError(f"--alpha must be a positive number for dirichlet, got {alpha}")
        if num_clients * 10 > num_samples:
            raise PartitionError(
                f"dirichlet needs at least 10 samples per client: {num_samples} samples "
                f"cannot feed {num_clients} clients; use at most {num_samples // 10}"
            )
    if scheme == "pathological":
        if classes_per_client is None or classes_per_client < 1:
            raise PartitionError(f"--classes-per-client must be at least 1, got {classes_per_client}")
        if classes_per_client > num_classes:
            raise PartitionError(
                f"--classes-per-client {classes_per_client} is more than the dataset's "
                f"{num_classes} classes: use at most {num_classes}"
            )


def _iid(n: int, *, seed: int, **_) -> IidPartitioner:
    return IidPartitioner(num_partitions=n)


def _dirichlet(n: int, *, alpha: float, seed: int, **_) -> DirichletPartitioner:
    return DirichletPartitioner(
        num_partitions=n, partition_by="label", alpha=alpha,
        min_partition_size=10, self_balancing=False, shuffle=True, seed=seed,
    )


def _pathological(n: int, *, classes_per_client: int, seed: int, **_) -> PathologicalPartitioner:
    # first-deterministic: client i always holds class i mod C, so every class is used.
    return PathologicalPartitioner(
        num_partitions=n, partition_by="label", num_classes_per_partition=classes_per_client,
        class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
    )


_PARTITIONERS: dict[str, Callable] = {"iid": _iid, "dirichlet": _dirichlet, "pathological": _pathological}


def partition(
    labels: np.ndarray, scheme: str, num_clients: int, *, alpha: float | None = None,
    classes_per_client: int | None = None, seed: int = 0, num_classes: int | None = None,
) -> list[np.ndarray]:
    """Split sample positions 0..len(labels)-1 into `num_clients` disjoint index arrays.

    The same arguments always give the same partition."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = num_classes or int(labels.max()) + 1
    check_partition_args(scheme, len(labels), num_classes, num_clients, alpha, classes_per_client)
    table = datasets.Dataset.from_dict({"label": labels, "row": np.arange(len(labels))})
    if scheme == "iid":  # IidPartitioner cuts contiguous shards: shuffle first, seeded.
        table = table.shuffle(seed=seed)
    partitioner = _PARTITIONERS[scheme](
        num_clients, alpha=alpha, classes_per_client=classes_per_client, seed=seed
    )
    partitioner.dataset = table
    try:
        shards = [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as err:  # e.g. Dirichlet could not give every client 10 samples
        raise PartitionError(f"{scheme} partition failed ({err}): use fewer clients or a larger alpha") from err
    return [np.sort(s) for s in shards]


def hold_out(labels: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (proxy, rest): a seeded, class-stratified slice of `size`
    samples kept for the server. Its labels never reach a strategy."""
    labels = np.asarray(labels)
    if size < 0 or size >= len(labels):
        raise DatasetError(
            f"--proxy-size {size} must be between 0 and {len(labels) - 1} (the training set has {len(labels)})"
        )
    positions = np.arange(len(labels))
    if size == 0:
        return positions[:0], positions
    num_classes = len(np.unique(labels))
    stratify = labels if min(size, len(labels) - size) >= num_classes else None
    proxy, rest = train_test_split(positions, train_size=size, stratify=stratify, random_state=seed)
    proxy, rest = np.sort(proxy), np.sort(rest)
    return proxy, rest


def class_histogram(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) matrix of sample counts."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


def label_skew(histogram: np.ndarray) -> float:
    """Mean total-variation distance between each client's label distribution and the
    global one: 0 for identical distributions, towards 1 for disjoint ones."""
    hist = np.asarray(histogram, dtype=np.float64)
    global_dist = hist.sum(0) / hist.sum()
    client_dist = hist / np.maximum(hist.sum(1, keepdims=True), 1)
    return float(0.5 * np.abs(client_dist - global_dist).sum(1).mean())
