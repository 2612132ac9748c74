"""Flower's server optimisers (FedAvgM, FedAdam, FedYogi; Reddi et al., "Adaptive
Federated Optimization", arXiv 2003.00295) under fedfuse's run discipline.

Two things the library leaves to its user: norm statistics (BatchNorm running mean and
variance) travel with the weights but are not weights, so they take FedAvg's plain
average rather than a server step (a momentum step can drive a variance below zero); and
the optimiser's state (momentum, Adam's moments) is saved with the run's checkpoint, so
a resumed run continues the same trajectory."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi

from models import NORM_STATISTICS
from strategies.messages import array_record
from strategies.recording import RecordedRounds

# The optimisers' state: FedAvgM's momentum and its own copy of the global model;
# FedOpt's first and second moments (FedOpt takes the global model from each round's
# message, so it keeps no copy across rounds).
_STATE = ("momentum_vector", "current_arrays", "m_t", "v_t")


class ServerOptimizer(RecordedRounds):
    """Place before the Flower strategy: class X(ServerOptimizer, FedAvgM)."""

    def aggregate_valid(self, server_round: int, valid, record):
        stepped, metrics = super().aggregate_valid(server_round, valid, record)
        statistics = [name for name in stepped.keys() if name.endswith(NORM_STATISTICS)]
        # The plain average, for norm statistics only (a model without norms needs none).
        average = FedAvg.aggregate_train(self, server_round, valid)[0] if statistics else {}
        # Back to the dtypes the clients train in (the optimisers compute in float64).
        arrays = {name: (average if name in statistics else stepped)[name].numpy().astype(self._global[name].dtype)
                  for name in stepped.keys()}
        result = array_record(arrays)
        if isinstance(getattr(self, "current_arrays", None), ArrayRecord):  # FedAvgM steps from its own copy
            self.current_arrays = result
        return result, metrics

    def server_state(self) -> dict:
        return {name: _plain(getattr(self, name)) for name in _STATE if getattr(self, name, None) is not None}

    def load_server_state(self, state: dict) -> None:
        for name, value in state.items():
            # FedAvgM keeps its copy of the global model as an ArrayRecord, FedOpt as numpy arrays.
            setattr(self, name, array_record(value) if name == "current_arrays" and isinstance(self, FedAvgM)
                    else value)


def _plain(value):
    """Picklable without Flower: an ArrayRecord becomes a dict of numpy arrays."""
    if isinstance(value, ArrayRecord):
        return {k: v.numpy() for k, v in value.items()}
    if isinstance(value, list):
        return [np.asarray(v) for v in value]
    return {k: np.asarray(v) for k, v in value.items()} if isinstance(value, dict) else value


class RecordedFedAvgM(ServerOptimizer, FedAvgM):
    """flwr's FedAvgM: server SGD with momentum on the average's pseudo-gradient."""


class RecordedFedAdam(ServerOptimizer, FedAdam):
    """flwr's FedAdam."""


class RecordedFedYogi(ServerOptimizer, FedYogi):
    """flwr's FedYogi."""
