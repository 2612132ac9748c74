"""What a client is asked to do, as sent in the train message's ConfigRecord.

The server builds it from the run settings; the client parses it back. Carrying the
federation spec in every message means a ClientApp needs no run config of its own, so
`fedfuse run` and `flwr run .` drive the same ClientApp."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from data import FederationSpec, InputSpec
from data.federation import fields_from_mapping


@dataclass(frozen=True)
class TrainTask:
    federation: FederationSpec = field(default_factory=FederationSpec)
    model: str = "simple-cnn"
    pretrained: bool = True
    weights: str = ""  # local checkpoint for timm models
    projection: bool = False
    pointwise: str = "freeze"  # what projection does with 1x1 convs: project, freeze, train
    resolution: int = 0  # input side in pixels; 0: the model's default
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    client_cpus: float = 1.0
    proximal_mu: float = 0.0  # FedProx sets "proximal-mu" itself; 0 is plain SGD
    # Fusion: per-neuron attribution after training ("" when the strategy needs none),
    # on at most this many of the client's samples, and whether the class histogram is sent.
    attribution: str = ""
    attribution_samples: int = 256
    share_class_counts: bool = False
    # Fault injection (simulation features, seeded): fail with this probability; the
    # poisoned partitions send a broken update of the given kind.
    client_failure_rate: float = 0.0
    poison_clients: int = 0
    poison: str = "nan"
    server_round: int = 0

    def to_config(self) -> dict:
        """Flat kebab-case dict of scalars, as a Flower ConfigRecord holds."""
        values = {k: v for k, v in asdict(self).items() if k != "federation"}
        values.update(self.federation.to_dict())
        return {k.replace("_", "-"): v for k, v in values.items()}

    @classmethod
    def from_config(cls, config) -> "TrainTask":
        return cls(federation=FederationSpec.from_mapping(config),
                   **fields_from_mapping(cls, config, skip=("federation",)))

    def build_model(self, num_classes: int):
        """The model clients train: created, then projected when asked.

        Seeded by the run's seed: tensors that never travel (frozen kernels of a
        randomly initialised projected model) must be the same on the server and on
        every client."""
        import torch

        import models

        with torch.random.fork_rng():
            torch.manual_seed(self.federation.seed)
            model = models.create(self.model, num_classes, pretrained=self.pretrained, weights=self.weights or None)
        return models.project(model, pointwise=self.pointwise, inplace=True) if self.projection else model

    def input_spec(self, dataset) -> InputSpec:
        return input_spec(self.model, dataset, self.resolution)


def input_spec(model_name: str, dataset, resolution: int = 0) -> InputSpec:
    """How a batch of the dataset's uint8 images becomes this model's input."""
    import models

    info = models.info(model_name)
    mean, std = info.normalization or (dataset.mean, dataset.std)
    return InputSpec(info.input_channels, resolution or info.input_size, tuple(mean), tuple(std))
