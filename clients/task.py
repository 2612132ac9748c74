"""What a client is asked to do, as sent in the train message's ConfigRecord.

The server builds it from the run settings; the client parses it back. Carrying the
federation spec in every message means a ClientApp needs no run config of its own, so
`fedfuse run` and `flwr run .` drive the same ClientApp."""

from __future__ import annotations

from dataclasses import dataclass

import models
from clients.attacks import ABSENT, ATTACK_KINDS
from clients.faults import POISON_KINDS
from clients.training import NORM_STATS
from data import FederationSpec, InputSpec
from data.settings import Check, from_flat, internal, nested, number, setting, to_flat, whole
from strategies.fusion.attribution import METHODS as ATTRIBUTION_METHODS

FUSION = ("fusion",)


@dataclass(frozen=True)
class TrainTask:
    """The clients' side of a run: the model and how it trains, fusion's client-side
    inputs and the injected faults."""

    federation: FederationSpec = nested(FederationSpec)
    model: str = setting("simple-cnn", "simple-cnn (1x28x28), efficientnet-lite0 (ImageNet weights), timm:NAME")
    pretrained: bool = setting(True, "start from pretrained weights (--no-pretrained: random init)")
    weights: str = setting("", "local checkpoint for a timm:NAME model")
    projection: bool = setting(False, "train one scale per (output, input) channel pair over frozen kernels "
                                      "(default: on for pretrained backbones)")
    pointwise: str = setting("freeze", "projection's policy for 1x1 convs", choices=models.POINTWISE_POLICIES)
    resolution: int = setting(0, "input side in pixels for ImageNet backbones (0: the model's default)",
                              check=Check(lambda v: v == 0 or 8 <= v <= 1024,
                                          "must be 0 (the model's default) or between 8 and 1024 pixels"))
    local_epochs: int = setting(1, "passes over the shard per round", check=whole(1))
    local_steps: int = setting(0, "SGD steps per round on every client, cycling through its shard as often as "
                                  "needed (K local steps, as in SCAFFOLD and FedNova); 0: local_epochs passes",
                              check=whole(0))
    batch_size: int = setting(64, "local batch size", check=whole(1))
    lr: float = setting(0.01, "local SGD learning rate", check=number(0, low_open=True, phrase="must be a positive number"))
    momentum: float = setting(0.9, "local SGD momentum", check=number(0, 1, high_open=True))
    weight_decay: float = setting(0.0, "local SGD weight decay", check=number(0, phrase="must be >= 0"))
    norm_stats: str = setting("batch", "how BatchNorm normalises in local training: batch (each batch's statistics; "
                                       "the running ones are averaged like weights) or frozen (the global model's "
                                       "running statistics, never updated by clients); without the flag, frozen "
                                       "for pretrained backbones", choices=NORM_STATS)
    client_cpus: float = setting(1.0, "CPUs Ray reserves per client (and its torch threads)",
                                 check=number(0, low_open=True, phrase="must be positive"))
    attribution: str = setting("gradxact", "how clients score their neurons on their shard (captum): gradxact, "
                                           "conductance, or uniform (the ablation)",
                               choices=ATTRIBUTION_METHODS, strategies=FUSION)
    attribution_samples: int = setting(256, "client samples the attribution uses", check=whole(1), strategies=FUSION)
    share_class_counts: bool = setting(True, "clients send their class histogram, which weighs the head's targets",
                                       strategies=FUSION)
    client_failure_rate: float = setting(0.0, "fault injection: each sampled client crashes with this probability",
                                         check=number(0, 1, high_open=True))
    poison_clients: int = setting(0, "fault injection: this many clients (the same all run) send broken updates",
                                  check=whole(0))
    poison: str = setting("nan", "their kind of broken update", choices=POISON_KINDS)
    attackers: int = setting(0, "Byzantine simulation: this many clients (the same all run) send well-formed "
                                "attacked updates", check=whole(0))
    attack: str = setting("sign-flip", "their attack: sign-flip, label-flip, lie-counts (all examples claimed for "
                                       "one class), lie-size (10x the examples claimed), noise, or absent (they send "
                                       "nothing: the reference a perfect defence would reach)",
                          choices=(*ATTACK_KINDS, ABSENT))
    proximal_mu: float = internal(0.0)  # FedProx sets "proximal-mu" itself; 0 is plain SGD
    server_round: int = internal(0)

    def to_config(self) -> dict:
        """Flat kebab-case dict of scalars, as a Flower ConfigRecord holds."""
        return {k.replace("_", "-"): v for k, v in to_flat(self, internal_too=True).items()}

    @classmethod
    def from_config(cls, config) -> "TrainTask":
        """The task from a message's config (which may carry other keys, e.g. the check's)."""
        return from_flat(cls, config, strict=False, internal_too=True)

    def build_model(self, num_classes: int):
        """The model clients train: created, then projected when asked.

        Seeded by the run's seed: tensors that never travel (frozen kernels of a
        randomly initialised projected model) must be the same on the server and on
        every client."""
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(self.federation.seed)
            model = models.create(self.model, num_classes, pretrained=self.pretrained, weights=self.weights or None)
        return models.project(model, pointwise=self.pointwise, inplace=True) if self.projection else model

    def input_spec(self, dataset) -> InputSpec:
        return input_spec(self.model, dataset, self.resolution)


def input_spec(model_name: str, dataset, resolution: int = 0) -> InputSpec:
    """How a batch of the dataset's uint8 images becomes this model's input."""
    info = models.info(model_name)
    mean, std = info.normalization or (dataset.mean, dataset.std)
    return InputSpec(info.input_channels, resolution or info.input_size, tuple(mean), tuple(std))
