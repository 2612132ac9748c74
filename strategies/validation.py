"""Checks every client reply before it may touch the global model."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict


def reply_problem(content: RecordDict, expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why this train reply must be rejected, or None when it is usable.

    `expected` maps each exchanged tensor name to the shape and dtype the server sent."""
    if len(content.array_records) != 1 or "arrays" not in content.array_records:
        return "reply must hold exactly one ArrayRecord named 'arrays'"
    if "metrics" not in content.metric_records:
        return "reply has no MetricRecord named 'metrics'"
    metrics = content.metric_records["metrics"]
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, (int, float)) or not num_examples > 0:
        return f"num-examples must be positive, got {num_examples}"
    arrays = content.array_records["arrays"]
    missing, extra = set(expected) - set(arrays), set(arrays) - set(expected)
    if missing or extra:
        return f"wrong keys: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    for name, (shape, dtype) in expected.items():
        value = arrays[name].numpy()
        if tuple(value.shape) != tuple(shape):
            return f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if value.dtype != dtype:
            return f"{name} has dtype {value.dtype}, expected {dtype}"
        if not np.isfinite(value).all():
            return f"{name} has non-finite values"
    return None
