"""A batch iterator over in-memory uint8 arrays (no per-item Python overhead)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from data.transforms import InputSpec, to_model_input


class BatchLoader:
    """Yields (inputs, labels) float batches, or inputs alone when labels is None.

    Shuffling is seeded and advances one epoch at a time, so a loader replays the same
    batch order for the same seed."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray | None, spec: InputSpec, batch_size: int = 64,
        shuffle: bool = False, seed: int = 0, device: str | torch.device = "cpu",
    ) -> None:
        # np.require copies only read-only or strided arrays (torch cannot wrap read-only memory).
        self.images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.spec, self.batch_size, self.shuffle, self.device = spec, batch_size, shuffle, device
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator:
        n = len(self.images)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = to_model_input(self.images[idx].to(self.device), self.spec)
            if self.labels is None:
                yield x
            else:
                yield x, self.labels[idx].to(self.device)
