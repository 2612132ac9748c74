"""Flower's Byzantine-robust aggregation rules (Krum: Blanchard et al., NeurIPS 2017;
FedMedian and FedTrimmedAvg, the coordinate-wise median and trimmed mean: Yin et al.,
ICML 2018) under fedfuse's run discipline.

Two things the library leaves to its user: the rules compute in float64, so the result
goes back to the dtypes the clients train in; and FedTrimmedAvg takes the tensors out
of the replies as it goes, so the round's valid updates are kept as copies first (the
report's output ensemble is made of them)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from strategies.messages import array_record
from strategies.recording import RecordedRounds


class RobustRule(RecordedRounds):
    """Place before the Flower strategy: class X(RobustRule, Krum)."""

    def aggregate_valid(self, server_round: int, valid, record):
        self.last_updates = [array_record({k: v.numpy() for k, v in update.items()}) for update in self.last_updates]
        arrays, metrics = super().aggregate_valid(server_round, valid, record)
        return array_record({k: v.numpy().astype(self._global[k].dtype) for k, v in arrays.items()}), metrics


class RecordedKrum(RobustRule, Krum):
    """flwr's Krum: the one update closest to its n - f - 2 nearest others goes out."""


class RecordedFedMedian(RobustRule, FedMedian):
    """flwr's FedMedian: the coordinate-wise median of the updates."""


class RecordedFedTrimmedAvg(RobustRule, FedTrimmedAvg):
    """flwr's FedTrimmedAvg: per coordinate, the mean without the `beta` share at each end."""
