"""Run settings: one dataclass for `fedfuse run`, `flwr run .` and the bench, checked
in full before Ray starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import data
import models
import strategies
from clients.faults import POISON_KINDS
from clients.task import TrainTask
from data import FederationSpec
from data.federation import fields_from_mapping
from strategies.fusion.attribution import METHODS as ATTRIBUTION_METHODS
from strategies.neuron_fusion import CHECKS as FUSION_CHECKS

MIN_FUSION_PROXY = 32


class SettingsError(ValueError):
    """A setting that cannot work; the message names the flag and the fix."""


@dataclass(frozen=True)
class RunSettings:
    federation: FederationSpec = field(default_factory=FederationSpec)
    strategy: str = "fedavg"
    model: str = "simple-cnn"
    pretrained: bool = True
    weights: str = ""
    projection: bool = False
    pointwise: str = "freeze"
    resolution: int = 0
    full_finetune_rounds: int = 0
    full_finetune_lr: float = 0.0  # 0: same as lr
    rounds: int = 10
    fraction: float = 1.0
    min_clients: int = 1
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.01
    attribution: str = "gradxact"  # fusion's neuron scores: uniform, gradxact, conductance
    attribution_samples: int = 256
    share_class_counts: bool = True  # fusion: clients send their class histogram (head targets)
    fusion_check: str = "clients"  # fused vs averaged model: clients' accuracy, proxy agreement, or off
    check_samples: int = 500  # fusion check "clients": examples per client
    fusion_rounds: int = 0  # fusion: fuse in the first N rounds only, then average (FedAvg); 0: every round
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    ray_address: str = ""
    ray_num_cpus: int = 0  # 0: let Ray count this machine's CPUs
    ray_num_gpus: float = -1.0  # -1: let Ray detect GPUs; >= 0 declares logical GPUs
    out: str = "runs/latest"
    resume: bool = False  # continue the run in `out` from its last complete round
    client_failure_rate: float = 0.0  # fault injection: each sampled client fails with this probability
    poison_clients: int = 0  # fault injection: this many clients send broken updates...
    poison: str = "nan"  # ... of this kind: nan, inf, scale, shape

    def to_dict(self) -> dict:
        values = asdict(self)
        values["federation"] = self.federation.to_dict()
        return values

    @classmethod
    def from_mapping(cls, values) -> "RunSettings":
        """From a flat mapping such as Flower's run config (kebab-case keys). Without a
        `projection` key, projection is on for pretrained backbones."""
        kwargs = {"federation": FederationSpec.from_mapping(values),
                  **fields_from_mapping(cls, values, skip=("federation",))}
        if "projection" not in values:
            kwargs["projection"] = default_projection(kwargs.get("model", cls.model), kwargs.get("pretrained", True))
        return cls(**kwargs)

    def train_task(self, full_finetune: bool = False) -> TrainTask:
        """The clients' task; `full_finetune` is the phase after folding, where every
        weight trains."""
        return TrainTask(
            federation=self.federation, model=self.model, pretrained=self.pretrained, weights=self.weights,
            projection=self.projection and not full_finetune, pointwise=self.pointwise,
            resolution=self.resolution, local_epochs=self.local_epochs, batch_size=self.batch_size,
            lr=(self.full_finetune_lr or self.lr) if full_finetune else self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, client_cpus=self.client_cpus,
            attribution=self.attribution if self.strategy == "fusion" else "",
            attribution_samples=self.attribution_samples,
            share_class_counts=self.share_class_counts and self.strategy == "fusion",
            client_failure_rate=self.client_failure_rate, poison_clients=self.poison_clients, poison=self.poison,
        )

    @property
    def total_rounds(self) -> int:
        return self.rounds + self.full_finetune_rounds

    def validate(self) -> "data.ImageDataset":
        """Raise SettingsError (or DatasetError/ModelError/PartitionError, all
        ValueErrors) naming the problem; return the loaded dataset when all is well."""
        if self.strategy not in strategies.names():
            raise SettingsError(f"unknown --strategy '{self.strategy}': choose one of {', '.join(strategies.names())}")
        models.info(self.model)
        if self.pointwise not in models.POINTWISE_POLICIES:
            raise SettingsError(f"--pointwise must be one of {', '.join(models.POINTWISE_POLICIES)}, got '{self.pointwise}'")
        if self.full_finetune_rounds < 0 or int(self.full_finetune_rounds) != self.full_finetune_rounds:
            raise SettingsError(f"--full-finetune-rounds must be a whole number >= 0, got {self.full_finetune_rounds}")
        if self.full_finetune_rounds and not self.projection:
            raise SettingsError("--full-finetune-rounds continues a projected run: add --projection")
        if self.resolution and not (8 <= self.resolution <= 1024):
            raise SettingsError(f"--resolution must be between 8 and 1024 pixels, got {self.resolution}")
        if self.model == "simple-cnn" and self.resolution not in (0, 28):
            raise SettingsError("simple-cnn takes 28x28 input: drop --resolution")
        if self.weights and not Path(self.weights).is_file():
            raise SettingsError(f"--weights {self.weights} does not exist: give the path of a checkpoint file")
        if self.model.startswith("timm:") and self.pretrained and not self.weights:
            _check_timm_weights_reachable(self.model)
        _positive_int("--rounds", self.rounds)
        _positive_int("--local-epochs", self.local_epochs)
        _positive_int("--batch-size", self.batch_size)
        _positive_int("--min-clients", self.min_clients)
        if not (0.0 < self.fraction <= 1.0):
            raise SettingsError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"--lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.full_finetune_lr) and self.full_finetune_lr >= 0):
            raise SettingsError(f"--full-finetune-lr must be >= 0, got {self.full_finetune_lr}")
        if not (0.0 <= self.momentum < 1.0):
            raise SettingsError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise SettingsError(f"--proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.attribution not in ATTRIBUTION_METHODS:
            raise SettingsError(f"--attribution must be one of {', '.join(ATTRIBUTION_METHODS)}, got '{self.attribution}'")
        _positive_int("--attribution-samples", self.attribution_samples)
        if self.fusion_check not in FUSION_CHECKS:
            raise SettingsError(f"--fusion-check must be one of {', '.join(FUSION_CHECKS)}, got '{self.fusion_check}'")
        _positive_int("--check-samples", self.check_samples)
        if not (0 <= self.fusion_rounds) or int(self.fusion_rounds) != self.fusion_rounds:
            raise SettingsError(f"--fusion-rounds must be a whole number >= 0 (0: fuse every round), "
                                f"got {self.fusion_rounds}")
        if not (math.isfinite(self.client_failure_rate) and 0.0 <= self.client_failure_rate < 1.0):
            raise SettingsError(f"--client-failure-rate must be in [0, 1), got {self.client_failure_rate}")
        if not (0 <= self.poison_clients <= self.federation.clients) or int(self.poison_clients) != self.poison_clients:
            raise SettingsError(f"--poison-clients must be a whole number from 0 to --clients "
                                f"({self.federation.clients}), got {self.poison_clients}")
        if self.poison not in POISON_KINDS:
            raise SettingsError(f"--poison must be one of {', '.join(POISON_KINDS)}, got '{self.poison}'")
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
        if self.strategy == "fusion":
            if spec.proxy_size < MIN_FUSION_PROXY:
                raise SettingsError(f"--strategy fusion fits the fused model on the server's proxy set: "
                                    f"--proxy-size must be at least {MIN_FUSION_PROXY}, got {spec.proxy_size}")
            try:
                models.levels(self.train_task().build_model(dataset.num_classes))
            except ValueError as err:
                raise SettingsError(f"--strategy fusion cannot cut --model {self.model} into levels: {err}") from None
        return dataset


def default_projection(model: str, pretrained: bool) -> bool:
    """Projection is the default for pretrained backbones, off for models from scratch."""
    return bool(pretrained and models.info(model).pretrained)


def _check_timm_weights_reachable(model: str) -> None:
    """Fail in a second, not after a minute of download retries, when pretrained timm
    weights are neither cached nor downloadable."""
    import socket

    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model.removeprefix("timm:"))
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if repo and any(isinstance(try_to_load_from_cache(repo, f), str)
                    for f in ("model.safetensors", "pytorch_model.bin")):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise SettingsError(
            f"no cached pretrained weights for {model} and no network: pass --weights PATH "
            "or --no-pretrained"
        ) from None


def _positive_int(flag: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise SettingsError(f"{flag} must be a positive whole number, got {value}")
