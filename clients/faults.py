"""Fault injection for simulations: clients that crash, clients that send broken
updates. Both are seeded by the run's seed, so a faulty run is as repeatable as a clean
one; the server must survive both (never averaging or fusing a broken update)."""

from __future__ import annotations

import zlib

import numpy as np

POISON_KINDS = ("nan", "inf", "scale", "shape")
SCALE_FACTOR = 1e4  # finite and of the right shape: only a norm check catches it


class InjectedFailure(RuntimeError):
    """A crash the simulation asked for (--client-failure-rate)."""


def seeded_rng(*parts) -> np.random.Generator:
    """A generator seeded by its parts (seed, round, partition, ...): the same draws every run."""
    return np.random.default_rng(zlib.crc32("/".join(str(p) for p in parts).encode()))


def maybe_fail(rate: float, seed: int, server_round: int, partition_id: int) -> None:
    if rate > 0 and seeded_rng("fail", seed, server_round, partition_id).random() < rate:
        raise InjectedFailure(f"injected failure of client {partition_id} in round {server_round} "
                              f"(--client-failure-rate {rate})")


def poisoned_partitions(count: int, num_clients: int, seed: int) -> set[int]:
    """The same `count` partitions for the whole run, drawn with the run's seed."""
    return chosen_partitions("poison", count, num_clients, seed)


def chosen_partitions(kind: str, count: int, num_clients: int, seed: int) -> set[int]:
    """`count` partitions drawn with the run's seed, one draw per `kind` of fault."""
    return set(seeded_rng(kind, seed).permutation(num_clients)[:count].tolist())


def poison_state(state: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """A broken copy of an update: NaN or inf in its first float tensor, every tensor
    scaled by SCALE_FACTOR, or its first tensor one row short."""
    broken = {k: v.copy() for k, v in state.items()}
    first = next(k for k, v in broken.items() if np.issubdtype(v.dtype, np.floating))
    if kind == "nan":
        broken[first][...] = np.nan
    elif kind == "inf":
        broken[first][...] = np.inf
    elif kind == "scale":
        broken = {k: (v * SCALE_FACTOR).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v
                  for k, v in broken.items()}
    elif kind == "shape":
        broken[first] = broken[first][:-1]
    else:
        raise ValueError(f"unknown poison '{kind}': choose one of {', '.join(POISON_KINDS)}")
    return broken
