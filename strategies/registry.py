"""The Flower strategies fedfuse can run, by name."""

from __future__ import annotations

from typing import Callable

from flwr.serverapp.strategy import FedAvg, FedProx

from strategies.fusion.claims import CLAIM_CAP, SIZE_CAP
from strategies.fusion.screening import SCREEN_RATIO
from strategies.recording import RecordedRounds, RoundRecord, mean_train_loss
from strategies.robust import RecordedFedMedian, RecordedFedTrimmedAvg, RecordedKrum
from strategies.sampling import PartitionSampler
from strategies.server_optimizers import RecordedFedAdam, RecordedFedAvgM, RecordedFedYogi


class RecordedFedAvg(RecordedRounds, FedAvg):
    """flwr's FedAvg under fedfuse's run discipline."""


class RecordedFedProx(RecordedRounds, FedProx):
    """flwr's FedProx under fedfuse's run discipline."""


def _flower_kwargs() -> dict:
    # Sampling is done by PartitionSampler; Flower's own sampling then takes every node
    # it is shown. Evaluation is central (on the server's test set), not federated.
    return dict(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=0,
        min_available_nodes=1, train_metrics_aggr_fn=mean_train_loss,
    )


def _neuron_fusion(template, proxy, attribution="gradxact", num_classes=None, seed=0, fusion_check="clients",
                   check_samples=500, fusion_rounds=0, fusion_refine_steps=0, fusion_train_from="global",
                   fusion_blends=1, fusion_claim_cap=CLAIM_CAP, fusion_size_cap=SIZE_CAP, fusion_screen=SCREEN_RATIO,
                   fusion_head_target="log-probs", server_device="cpu", **_) -> RecordedRounds:
    from strategies.neuron_fusion import NeuronFusion

    return NeuronFusion(template, proxy, attribution, num_classes, seed, check=fusion_check,
                        check_samples=check_samples, fusion_rounds=fusion_rounds, refine_steps=fusion_refine_steps,
                        train_from=fusion_train_from, blends=fusion_blends, claim_cap=fusion_claim_cap,
                        size_cap=fusion_size_cap, screen_ratio=fusion_screen, head_target=fusion_head_target,
                        device=server_device, **_flower_kwargs())


def _feddf(template, proxy, seed=0, distill_check="off", check_samples=500, distill_steps=10_000, distill_lr=1e-3,
           distill_temperature=1.0, server_device="cpu", **_) -> RecordedRounds:
    from strategies.feddf import FedDF

    return FedDF(template, proxy, seed, check=distill_check, check_samples=check_samples, steps=distill_steps,
                 lr=distill_lr, temperature=distill_temperature, device=server_device, **_flower_kwargs())


def _adaptive(cls, eta=0.0, beta_1=0.9, beta_2=0.99, tau=1e-3, **_) -> RecordedRounds:
    """FedAdam or FedYogi; eta 0 keeps the library's own default (0.1 and 0.01)."""
    return cls(beta_1=beta_1, beta_2=beta_2, tau=tau, **({"eta": eta} if eta else {}), **_flower_kwargs())


_REGISTRY: dict[str, Callable[..., RecordedRounds]] = {
    "fedavg": lambda **_: RecordedFedAvg(**_flower_kwargs()),
    "fedprox": lambda proximal_mu=0.01, **_: RecordedFedProx(proximal_mu=proximal_mu, **_flower_kwargs()),
    "fedavgm": lambda server_lr=1.0, server_momentum=0.0, **_: RecordedFedAvgM(
        server_learning_rate=server_lr, server_momentum=server_momentum, **_flower_kwargs()),
    "fedadam": lambda **options: _adaptive(RecordedFedAdam, **options),
    "fedyogi": lambda **options: _adaptive(RecordedFedYogi, **options),
    "krum": lambda malicious_clients=0, **_: RecordedKrum(num_malicious_nodes=malicious_clients, **_flower_kwargs()),
    "fedmedian": lambda **_: RecordedFedMedian(**_flower_kwargs()),
    "fedtrimmedavg": lambda trim_beta=0.2, **_: RecordedFedTrimmedAvg(beta=trim_beta, **_flower_kwargs()),
    "fusion": _neuron_fusion,
    "feddf": _feddf,
}
# Strategies that merge the clients' models on the server's unlabeled proxy set.
PROXY_STRATEGIES = ("fusion", "feddf")


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **options) -> RecordedRounds:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy '{name}': choose one of {', '.join(names())}")
    return _REGISTRY[name](**options)


__all__ = ["PROXY_STRATEGIES", "PartitionSampler", "RecordedFedAvg", "RecordedFedProx", "RoundRecord", "build", "names"]
