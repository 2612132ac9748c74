"""Run settings: one dataclass for `fedfuse run`, `flwr run .` and the bench, checked
in full before Ray starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import data
import models
import strategies
from clients.task import TrainTask
from data import FederationSpec


class SettingsError(ValueError):
    """A setting that cannot work; the message names the flag and the fix."""


@dataclass(frozen=True)
class RunSettings:
    federation: FederationSpec = field(default_factory=FederationSpec)
    strategy: str = "fedavg"
    model: str = "simple-cnn"
    pretrained: bool = True
    projection: bool = False
    rounds: int = 10
    fraction: float = 1.0
    min_clients: int = 1
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.01
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str = ""
    ray_num_cpus: int = 0  # 0: let Ray count this machine's CPUs
    ray_num_gpus: float = -1.0  # -1: let Ray detect GPUs; >= 0 declares logical GPUs
    out: str = "runs/latest"

    def to_dict(self) -> dict:
        values = asdict(self)
        values["federation"] = self.federation.to_dict()
        return values

    @classmethod
    def from_mapping(cls, values) -> "RunSettings":
        """From a flat mapping such as Flower's run config (kebab-case keys)."""
        kwargs = {"federation": FederationSpec.from_mapping(values)}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if f.name != "federation" and key in values:
                kwargs[f.name] = type(f.default)(values[key])
        return cls(**kwargs)

    def train_task(self) -> TrainTask:
        return TrainTask(
            federation=self.federation, model=self.model, pretrained=self.pretrained,
            local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, client_cpus=self.client_cpus,
        )

    def validate(self) -> "data.ImageDataset":
        """Raise SettingsError (or DatasetError/ModelError/PartitionError, all
        ValueErrors) naming the problem; return the loaded dataset when all is well."""
        if self.strategy not in strategies.names():
            raise SettingsError(f"unknown --strategy '{self.strategy}': choose one of {', '.join(strategies.names())}")
        models.info(self.model)
        if self.projection:
            raise SettingsError("--projection is not available yet for this model: run with --no-projection")
        _positive_int("--rounds", self.rounds)
        _positive_int("--local-epochs", self.local_epochs)
        _positive_int("--batch-size", self.batch_size)
        _positive_int("--min-clients", self.min_clients)
        if not (0.0 < self.fraction <= 1.0):
            raise SettingsError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"--lr must be a positive number, got {self.lr}")
        if not (0.0 <= self.momentum < 1.0):
            raise SettingsError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise SettingsError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if not (self.client_cpus > 0):
            raise SettingsError(f"--client-cpus must be positive, got {self.client_cpus}")
        if not (0.0 <= self.client_gpus <= 1.0 or float(self.client_gpus).is_integer()):
            raise SettingsError(f"--client-gpus must be a fraction of one GPU or a whole number, got {self.client_gpus}")
        if self.client_gpus > 0 and self.ray_num_gpus == 0:
            raise SettingsError("--client-gpus > 0 but --ray-num-gpus 0 declares no GPU: raise one or the other")
        spec = self.federation
        if spec.seed < 0:
            raise SettingsError(f"--seed must be >= 0, got {spec.seed}")
        if spec.partition == "dirichlet" and not (math.isfinite(spec.alpha) and spec.alpha > 0):
            raise SettingsError(f"--alpha must be > 0 (smaller is more skewed), got {spec.alpha}")
        dataset = data.load(spec.dataset, spec.data_root or None, spec.download)
        data.hold_out(dataset.train_labels, spec.proxy_size, spec.seed)  # checks the size only
        data.check_partition_args(
            spec.partition, len(dataset.train_labels) - spec.proxy_size, dataset.num_classes,
            spec.clients, spec.alpha, spec.classes_per_client,
        )
        return dataset


def _positive_int(flag: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise SettingsError(f"{flag} must be a positive whole number, got {value}")
