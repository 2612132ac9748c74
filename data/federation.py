"""A federation's data: the dataset, the server's proxy slice and one shard per client.

Both the server and every client build it from the same FederationSpec; the build is
seeded, so they agree on every index without shipping any data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

from data.datasets import ImageDataset, load
from data.partition import class_histogram, hold_out, partition


def fields_from_mapping(cls, values, skip: tuple[str, ...] = ()) -> dict:
    """Keyword arguments for dataclass `cls` from a flat mapping such as Flower's run
    config or a ConfigRecord: kebab- or snake-case keys, values cast to each field's
    default type, unknown keys ignored."""
    kwargs = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        for key in (f.name, f.name.replace("_", "-")):
            if key in values:
                kwargs[f.name] = type(f.default)(values[key])
    return kwargs


@dataclass(frozen=True)
class FederationSpec:
    dataset: str = "fashion-mnist"
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    clients: int = 10
    proxy_size: int = 1000
    seed: int = 0
    data_root: str = ""  # "" means the dataset's default folder
    download: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values) -> "FederationSpec":
        return cls(**fields_from_mapping(cls, values))


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
