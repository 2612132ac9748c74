"""Checks every client reply before it may touch the global model."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict


def reply_problem(content: RecordDict, expected: dict[str, tuple[tuple[int, ...], np.dtype]],
                  attribution_widths: dict[str, int] | None = None, num_classes: int | None = None) -> str | None:
    """Why this train reply must be rejected, or None when it is usable.

    `expected` maps each exchanged tensor name to the shape and dtype the server sent.
    Fusion replies also carry an ArrayRecord 'attributions' (one finite, non-negative
    score per neuron of each level: `attribution_widths`, level name -> width) and, when
    class counts are shared, a MetricRecord 'class-counts' of `num_classes` counts that
    add up to num-examples. Any other record is refused."""
    arrays_wanted = {"arrays"} | ({"attributions"} if attribution_widths is not None else set())
    if set(content.array_records) != arrays_wanted:
        return f"reply must hold the ArrayRecords {sorted(arrays_wanted)}, got {sorted(content.array_records)}"
    metrics_wanted = {"metrics"} | ({"class-counts"} if num_classes is not None else set())
    if set(content.metric_records) != metrics_wanted:
        return f"reply must hold the MetricRecords {sorted(metrics_wanted)}, got {sorted(content.metric_records)}"
    metrics = content.metric_records["metrics"]
    num_examples = metrics.get("num-examples")
    if not isinstance(num_examples, (int, float)) or not num_examples > 0:
        return f"num-examples must be positive, got {num_examples}"
    problem = _tensor_problem(content.array_records["arrays"], expected, "")
    if problem is None and attribution_widths is not None:
        widths = {name: ((width,), np.dtype(np.float32)) for name, width in attribution_widths.items()}
        problem = _tensor_problem(content.array_records["attributions"], widths, "attributions ")
        if problem is None and any((a.numpy() < 0).any() for a in content.array_records["attributions"].values()):
            problem = "attributions must be non-negative"
    if problem is None and num_classes is not None:
        counts = content.metric_records["class-counts"].get("counts")
        if not isinstance(counts, list) or len(counts) != num_classes or any(c < 0 for c in counts):
            problem = f"class-counts must be {num_classes} non-negative counts"
        elif sum(counts) != num_examples:
            problem = f"class-counts add up to {sum(counts)}, but num-examples is {num_examples}"
    return problem


def _tensor_problem(record, expected: dict[str, tuple[tuple[int, ...], np.dtype]], what: str) -> str | None:
    missing, extra = set(expected) - set(record), set(record) - set(expected)
    if missing or extra:
        return f"{what}wrong keys: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
    for name, (shape, dtype) in expected.items():
        value = record[name].numpy()
        if tuple(value.shape) != tuple(shape):
            return f"{what}{name} has shape {tuple(value.shape)}, expected {tuple(shape)}"
        if value.dtype != dtype:
            return f"{what}{name} has dtype {value.dtype}, expected {dtype}"
        if not np.isfinite(value).all():
            return f"{what}{name} has non-finite values"
    return None
