"""A federation's data: the dataset, the server's proxy slice and one shard per client.

Both the server and every client build it from the same FederationSpec; the build is
seeded, so they agree on every index without shipping any data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

from data.datasets import ImageDataset, load, names
from data.partition import SCHEMES, class_histogram, hold_out, partition
from data.settings import setting, whole


@dataclass(frozen=True)
class FederationSpec:
    """The data side of a run: which dataset, how it is split, the proxy hold-out."""

    dataset: str = setting("fashion-mnist", "fashion-mnist (Debian package), cifar10 (local folder), mnist-5k, "
                           "digits, synthetic", choices=names)
    partition: str = setting("dirichlet", "label skew: iid, dirichlet (--alpha) or pathological (#C classes)",
                             choices=SCHEMES)
    alpha: float = setting(0.5, "Dirichlet concentration: smaller is more skewed")
    classes_per_client: int = setting(2, "#C for the pathological partition", check=whole(1))
    clients: int = setting(10, "number of simulated clients", check=whole(1))
    proxy_size: int = setting(1000, "training samples held out as the server's unlabeled proxy set",
                              check=whole(0))
    seed: int = setting(0, "same seed, same partition, sampled clients and shuffles", check=whole(0, "must be >= 0"))
    data_root: str = setting("", "folder of the dataset's files (default: its offline location)")
    download: bool = setting(False, "allow downloading the dataset (online only)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Federation:
    spec: FederationSpec
    data: ImageDataset
    proxy_indices: np.ndarray  # into data.train_*
    client_indices: tuple[np.ndarray, ...]  # into data.train_*, one per client

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def client_data(self, client: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.client_indices[client]
        return self.data.train_images[idx], self.data.train_labels[idx]

    def proxy_images(self) -> np.ndarray:
        """The server's unlabeled slice: images only, by design."""
        return self.data.train_images[self.proxy_indices]

    def histogram(self) -> np.ndarray:
        return class_histogram(self.data.train_labels, list(self.client_indices), self.num_classes)


@lru_cache(maxsize=4)
def build_federation(spec: FederationSpec) -> Federation:
    data = load(spec.dataset, spec.data_root or None, spec.download)
    proxy, rest = hold_out(data.train_labels, spec.proxy_size, spec.seed)
    shards = partition(
        data.train_labels[rest], spec.partition, spec.clients, alpha=spec.alpha,
        classes_per_client=spec.classes_per_client, seed=spec.seed, num_classes=data.num_classes,
    )
    return Federation(spec, data, proxy, tuple(rest[s] for s in shards))
