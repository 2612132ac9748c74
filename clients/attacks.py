"""Byzantine clients for simulations: well-formed replies meant to hurt the global model.

Unlike `clients.faults` (broken updates that validation must catch), every attacked
reply passes the server's validation by construction: the same keys, shapes and dtypes,
finite values, an update no larger than an honest one, class counts that add up. The
attackers are the same `attackers` partitions for the whole run, drawn with the run's
seed, and every random draw is seeded by (seed, round, partition).

- `sign-flip`: the honest update reversed (global - (local - global)): the same norm.
- `label-flip`: trains on flipped labels (class c becomes C - 1 - c), and reports the
  histogram of the labels it trained on.
- `lie-counts`: an honest model, but all of its examples claimed for the one class it
  holds fewest of: fusion weighs each model's logit of a class by its claimed share.
- `lie-size`: an honest model, with 10x its examples claimed (and its histogram scaled
  to match): FedAvg weighs each update by its example count.
- `noise`: a Gaussian update of the honest update's norm.

`absent` is the reference the attacks are measured against, not an attack: the same
clients send nothing (their training and check replies fail), so the run shows what a
perfect defence would leave, the clean run less the attackers' data."""

from __future__ import annotations

import numpy as np

from clients.faults import chosen_partitions, seeded_rng
from models import NORM_STATISTICS

ATTACK_KINDS = ("sign-flip", "label-flip", "lie-counts", "lie-size", "noise")
ABSENT = "absent"
SIZE_FACTOR = 10


def attacking_partitions(count: int, num_clients: int, seed: int) -> set[int]:
    """The same `count` partitions for the whole run, drawn with the run's seed."""
    return chosen_partitions("attack", count, num_clients, seed)


def is_attacker(task, partition_id: int) -> bool:
    return task.attackers > 0 and partition_id in attacking_partitions(task.attackers, task.federation.clients,
                                                                        task.federation.seed)


class AbsentAttacker(RuntimeError):
    """An `absent` attacker's reply: it fails, so the server goes on without it."""


def fail_if_absent(task, partition_id: int) -> None:
    if task.attack == ABSENT and is_attacker(task, partition_id):
        raise AbsentAttacker(f"client {partition_id} is one of the {task.attackers} absent attackers "
                             f"(--attack {ABSENT})")


def training_labels(task, partition_id: int, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The labels the client trains on: flipped for a label-flip attacker."""
    if task.attack == "label-flip" and is_attacker(task, partition_id):
        return (num_classes - 1 - labels).astype(labels.dtype)
    return labels


def _attacked_weights(name: str, value: np.ndarray) -> bool:
    # Norm statistics stay honest: they are averages, not weights (and a negative running
    # variance would be a broken update, which validation refuses).
    return np.issubdtype(value.dtype, np.floating) and not name.endswith(NORM_STATISTICS)


def attack_update(update, global_state: dict[str, np.ndarray], kind: str, seed: int, server_round: int,
                  partition_id: int):
    """The attacked copy of an honest `ClientUpdate` (label-flip acts in training,
    `training_labels`, and leaves the reply as it is)."""
    state, metrics = dict(update.state), dict(update.metrics)
    counts = None if update.class_counts is None else list(update.class_counts)
    if kind in ("sign-flip", "noise"):
        weights = [k for k, v in state.items() if _attacked_weights(k, v)]
        honest = {k: state[k].astype(np.float64) - global_state[k] for k in weights}
        if kind == "sign-flip":
            sent = {k: -v for k, v in honest.items()}
        else:
            rng = seeded_rng("noise", seed, server_round, partition_id)
            noise = {k: rng.standard_normal(v.shape) for k, v in honest.items()}
            sent = {k: v * (_norm(honest) / max(_norm(noise), 1e-12)) for k, v in noise.items()}
        state.update({k: (global_state[k] + sent[k]).astype(state[k].dtype) for k in weights})
    elif kind == "lie-counts" and counts is not None:
        held = np.array(counts)
        fewest = int(np.flatnonzero(held == held.min())[0])
        counts = [int(held.sum()) if c == fewest else 0 for c in range(len(held))]
    elif kind == "lie-size":
        metrics["num-examples"] = int(metrics["num-examples"]) * SIZE_FACTOR
        if counts is not None:
            counts = [int(c) * SIZE_FACTOR for c in counts]
    elif kind != "label-flip" and kind not in ATTACK_KINDS:
        raise ValueError(f"unknown attack '{kind}': choose one of {', '.join(ATTACK_KINDS)}")
    return type(update)(state, metrics, update.attributions, counts)


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in arrays.values())))
