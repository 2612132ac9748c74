"""FedAvg in one process, without Flower or Ray: every client trains from the global
state with the clients' own code (`local_update`), one after another in partition
order, and the states are averaged by example count. The lab benchmarks that need a
federation's rounds but not its transport (overhead's plain loop, fusion-target) share
this loop."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

from clients.local_update import ClientUpdate, local_update
from clients.task import TrainTask


@dataclass
class FedAvgRound:
    number: int
    updates: list[ClientUpdate]  # in partition order
    state: dict[str, np.ndarray]  # their example-weighted average: the next global state


def weighted_average(updates: list[ClientUpdate]) -> dict[str, np.ndarray]:
    """FedAvg's aggregate: the exchanged tensors averaged by the clients' example counts,
    in float64, back in each tensor's own dtype."""
    weights = np.array([u.metrics["num-examples"] for u in updates], dtype=np.float64)
    weights /= weights.sum()
    return {name: sum(w * u.state[name] for w, u in zip(weights, updates)).astype(value.dtype)
            for name, value in updates[0].state.items()}


def fedavg_rounds(task: TrainTask, initial_state: dict[str, np.ndarray], rounds: int) -> Iterator[FedAvgRound]:
    """Rounds 1..`rounds` of FedAvg over every client of `task.federation`, from
    `initial_state`; each round is yielded once its average is known."""
    state = initial_state
    for number in range(1, rounds + 1):
        round_task = replace(task, server_round=number)
        updates = [local_update(round_task, client, state) for client in range(task.federation.clients)]
        state = weighted_average(updates)
        yield FedAvgRound(number, updates, state)
