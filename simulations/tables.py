"""Terminal tables: per-client class histograms and run summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def histogram_table(histogram: np.ndarray, title: str = "samples per client and class") -> Table:
    histogram = np.asarray(histogram)
    table = Table(title=title, show_edge=False, pad_edge=False)
    table.add_column("client", justify="right")
    for c in range(histogram.shape[1]):
        table.add_column(str(c), justify="right")
    table.add_column("total", justify="right")
    for i, row in enumerate(histogram):
        table.add_row(str(i), *[str(v) if v else "." for v in row], str(int(row.sum())))
    return table


SUMMARY_COLUMNS = [
    ("run", lambda s, d: d),
    ("strategy", lambda s, d: s["strategy"]),
    ("model", lambda s, d: s["model"] + (" (projected)" if s.get("projection") else "")),
    ("split", lambda s, d: _partition_label(s)),
    ("rounds", lambda s, d: str(s["rounds"])),
    ("final acc", lambda s, d: f"{s['final_accuracy']:.4f}"),
    ("best acc", lambda s, d: f"{s['best_accuracy']:.4f}"),
    ("MB up", lambda s, d: f"{s['bytes_up'] / 1e6:.2f}"),
    ("MB down", lambda s, d: f"{s['bytes_down'] / 1e6:.2f}"),
    ("s/round", lambda s, d: f"{s['mean_round_s']:.2f}"),
    ("aggregate s", lambda s, d: f"{s['mean_aggregate_s']:.4f}"),
    ("clients used", lambda s, d: optional(s.get("mean_clients_used"), "{:.1f}")),
    ("attribution s", lambda s, d: optional(s.get("mean_attribution_s"), "{:.2f}")),
    ("fusion s", lambda s, d: optional(s.get("mean_fusion_s"), "{:.2f}")),
    ("fit loss after/before", lambda s, d: optional(_fit_ratio(s), "{:.3f}")),
    ("moved", lambda s, d: optional(s.get("mean_assignment_moved"), "{:.3f}")),
    ("fused rounds", lambda s, d: optional(s.get("rounds_fusion_selected"), "{}")),
]


def _fit_ratio(summary: dict) -> float | None:
    """Fusion: mean over levels of (fit loss after) / (fit loss before), each averaged over rounds."""
    before, after = summary.get("fit_loss_before_per_level"), summary.get("fit_loss_after_per_level")
    if not before:
        return None
    return float(np.mean([a / b if b > 0 else 1.0 for a, b in zip(after, before)]))


def optional(value, fmt: str = "{:.4f}") -> str:
    """The value formatted, or "-" when there is none."""
    return "-" if value is None else fmt.format(value)


def _partition_label(summary: dict) -> str:
    if summary["partition"] == "dirichlet":
        return f"dir({summary['alpha']:g})"
    if summary["partition"] == "pathological":
        return f"#C={summary['classes_per_client']}"
    return summary["partition"]


def summary_table(run_dirs: list[str | Path], title: str = "results") -> Table:
    table = Table(title=title)
    for name, _ in SUMMARY_COLUMNS:
        table.add_column(name, justify="left" if name in ("run", "strategy", "model", "split") else "right")
    for run_dir in run_dirs:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        table.add_row(*[fn(summary, Path(run_dir).name) for _, fn in SUMMARY_COLUMNS])
    return table


def curve_table(run_dirs: list[str | Path]) -> Table:
    """Accuracy per round, one column per run."""
    curves = {Path(d).name: json.loads((Path(d) / "summary.json").read_text())["accuracy_curve"] for d in run_dirs}
    table = Table(title="test accuracy per round")
    table.add_column("round", justify="right")
    for name in curves:
        table.add_column(name, justify="right")
    for r in range(max(len(c) for c in curves.values())):
        table.add_row(str(r), *[f"{c[r]:.4f}" if r < len(c) else "" for c in curves.values()])
    return table


def make_console() -> Console:
    """A terminal console; when output is piped, wide enough that tables keep their columns."""
    return Console(width=None if sys.stdout.isatty() else 160)


def print_tables(*tables: Table, console: Console | None = None) -> None:
    console = console or make_console()
    for table in tables:
        console.print(table)
