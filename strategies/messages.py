"""The tensors of fedfuse's messages: a name -> numpy array mapping as a Flower ArrayRecord
(models, per-level attributions, the fusion check's candidates)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def array_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})
