"""Terminal tables: per-client class histograms and run summaries."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from server.results import read_summary


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


LAST_ROUNDS = 3  # "last 3": one round's accuracy swings at high skew, the last few say more


def _megabytes(n: float) -> str:
    mb = n / 1e6
    return f"{mb:.1f}" if mb < 100 else f"{mb:.0f}"


def _last_rounds_mean(summary: dict) -> float | None:
    trained = summary["accuracy_curve"][1:]  # [0] is the initial model
    return float(np.mean(trained[-LAST_ROUNDS:])) if len(trained) >= LAST_ROUNDS else None


def _fused_rounds(summary: dict) -> str:
    fused = summary.get("rounds_fusion_selected")
    return "-" if fused is None else f"{fused}/{summary['rounds']}"


# What a user reads after a run: (header, cell, what the header means). The rest of
# summary.json (aggregation, attribution and fit figures) is in the grid report.
SUMMARY_COLUMNS = [
    ("run", lambda s, d: d, ""),
    ("strategy", lambda s, d: s["strategy"], ""),
    ("rounds", lambda s, d: str(s["rounds"]), ""),
    ("final", lambda s, d: f"{s['final_accuracy']:.4f}", "final, best: test accuracy"),
    ("best", lambda s, d: f"{s['best_accuracy']:.4f}", ""),
    (f"last {LAST_ROUNDS}", lambda s, d: optional(_last_rounds_mean(s)), f"last {LAST_ROUNDS}: mean of the last "
                                                                          f"{LAST_ROUNDS} rounds"),
    ("MB up/down", lambda s, d: f"{_megabytes(s['bytes_up'])}/{_megabytes(s['bytes_down'])}",
     "MB up/down: sent/received by the clients"),
    ("s/round", lambda s, d: f"{s['mean_round_s']:.2f}", ""),
    ("fused", lambda s, d: _fused_rounds(s), "fused: rounds the fused model went out"),
]
TEXT_COLUMNS = {"run", "strategy", "setup"}
# Shown only when some run has a value (fusion runs): a FedAvg table has no "fused" column.
SOMETIMES_EMPTY = {"fused"}


def optional(value, fmt: str = "{:.4f}") -> str:
    """The value formatted, or "-" when there is none."""
    return "-" if value is None else fmt.format(value)


def _partition_label(summary: dict) -> str:
    if summary["partition"] == "dirichlet":
        return f"dir({summary['alpha']:g})"
    if summary["partition"] == "pathological":
        return f"#C={summary['classes_per_client']}"
    return summary["partition"]


def _setup(summary: dict) -> dict[str, str]:
    return {"model": summary["model"] + (" (projected)" if summary.get("projection") else ""),
            "dataset": summary["dataset"], "split": _partition_label(summary), "clients": f"{summary['clients']} clients"}


def _narrow_table(title: str, caption: str | None = None) -> Table:
    """No outer border and two spaces between columns: room for the cells in 100 columns."""
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                 collapse_padding=True)


def _column(table: Table, header: str) -> None:
    """Text columns fold onto more lines when the terminal is narrow; number columns
    never wrap, so the text gives way and no cell is cut short."""
    if header in TEXT_COLUMNS:
        table.add_column(header, justify="left", overflow="fold")
    else:
        table.add_column(header, justify="right", no_wrap=True)


def summary_table(run_dirs: list[str | Path], title: str = "results") -> Table:
    """One line per run. What every run shares (model, dataset, split, clients) goes in
    the title; what differs between them, in a "setup" column."""
    summaries = [read_summary(d) for d in run_dirs]
    rows = [{header: cell(s, Path(d).name) for header, cell, _ in SUMMARY_COLUMNS} for s, d in zip(summaries, run_dirs)]
    shown = [(header, meaning) for header, _, meaning in SUMMARY_COLUMNS
             if header not in SOMETIMES_EMPTY or any(row[header] != "-" for row in rows)]
    setups = [_setup(s) for s in summaries]
    shared = [key for key in setups[0] if len({s[key] for s in setups}) == 1]
    title = ", ".join([title] + [setups[0][key] for key in shared]) if shared else title
    if len(shared) < len(setups[0]):
        shown.insert(2, ("setup", ""))
        for row, setup in zip(rows, setups):
            row["setup"] = " ".join(value for key, value in setup.items() if key not in shared)
    table = _narrow_table(title, caption="; ".join(meaning for _, meaning in shown if meaning))
    for header, _ in shown:
        _column(table, header)
    for row in rows:
        table.add_row(*[row[header] for header, _ in shown])
    return table


def curve_table(run_dirs: list[str | Path]) -> Table:
    """Accuracy per round, one column per run (round 0: the initial model)."""
    curves = [read_summary(d)["accuracy_curve"] for d in run_dirs]  # two runs may share a folder name
    table = _narrow_table("test accuracy per round")
    _column(table, "round")
    for run_dir in run_dirs:
        table.add_column(Path(run_dir).name, justify="right", overflow="fold")  # a long name folds above its numbers
    for r in range(max(len(c) for c in curves)):
        table.add_row(str(r), *[f"{c[r]:.4f}" if r < len(c) else "" for c in curves])
    return table


def curve_tables(run_dirs: list[str | Path], per_table: int = 8) -> list[Table]:
    """The accuracy curves, `per_table` runs side by side: more would not fit 100 columns."""
    return [curve_table(run_dirs[i:i + per_table]) for i in range(0, len(run_dirs), per_table)]


def make_console() -> Console:
    """A terminal console; when output is piped, wide enough that tables keep their columns."""
    return Console(width=None if sys.stdout.isatty() else 160)


def print_tables(*tables: Table, console: Console | None = None) -> None:
    console = console or make_console()
    for table in tables:
        console.print(table)
