"""Client sampling by partition id, seeded, independent of Flower's random node ids."""

from __future__ import annotations

from typing import Iterable

import numpy as np


class PartitionSampler:
    """Chooses which partitions train in a round; maps them to the nodes holding them.

    Flower gives simulated nodes random ids, so sampling node ids (as FedAvg does with
    `random.sample`) picks different clients every run. Sampling partition ids with a
    per-round seeded generator picks the same clients for the same seed."""

    def __init__(self, node_to_partition: dict[int, int], fraction: float, min_clients: int, seed: int):
        self.node_to_partition = dict(node_to_partition)
        self.partition_to_node = {p: n for n, p in self.node_to_partition.items()}
        self.fraction, self.min_clients, self.seed = fraction, min_clients, seed

    @property
    def num_clients(self) -> int:
        return len(self.partition_to_node)

    def sample_size(self) -> int:
        return min(self.num_clients, max(self.min_clients, int(round(self.fraction * self.num_clients))))

    def sample_partitions(self, server_round: int) -> list[int]:
        partitions = np.array(sorted(self.partition_to_node))
        rng = np.random.default_rng([self.seed, server_round])
        return sorted(int(p) for p in rng.choice(partitions, size=self.sample_size(), replace=False))

    def sample_nodes(self, server_round: int) -> list[int]:
        return [self.partition_to_node[p] for p in self.sample_partitions(server_round)]

    def partition_of(self, node_id: int) -> int:
        return self.node_to_partition.get(node_id, -1)


class FixedNodes:
    """A Grid view that lists only the given nodes, so a Flower strategy's own sampling
    (fraction 1.0) takes exactly them; everything else goes to the real grid."""

    def __init__(self, grid, node_ids: Iterable[int]):
        self._grid, self._node_ids = grid, list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name):
        return getattr(self._grid, name)
