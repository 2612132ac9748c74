"""`fedfuse bench CONFIG.toml --out DIR`: run a grid of federations (and the centralised
references), then write DIR/results.csv, DIR/report.md and the plots.

Runs that finished earlier in DIR (their summary.json exists) are kept, so an
interrupted grid continues where it stopped; a run that fails is recorded in
DIR/failures.jsonl and the grid goes on."""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import time
import traceback
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.results import is_finished, read_summary
from simulations.grid import CENTRALISED, Grid, GridRun, load_grid
from simulations.report import write_outputs
from simulations.tables import make_console, optional, print_tables


def _run_one(run: GridRun) -> None:
    if run.strategy == CENTRALISED:
        from simulations.centralised import run_centralised

        run_centralised(run.settings)
    else:
        from simulations.simulate import simulate

        simulate(run.settings, show_progress=False)


def _select(grid: Grid, only: list[str] | None) -> list[GridRun]:
    """The grid's runs, or the slice whose ids match one of the `only` glob patterns (one
    model, one seed...): several machines or sessions can share one grid directory."""
    if not only:
        return grid.runs
    matched = {p: {r.run_id for r in grid.runs if fnmatch.fnmatchcase(r.run_id, p)} for p in only}
    unknown = [p for p, ids in matched.items() if not ids]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)} matches no run of {grid.source}; run ids look like "
                         f"{grid.runs[-1].run_id}")
    return [r for r in grid.runs if any(r.run_id in ids for ids in matched.values())]


def plan_grid(config: str, out: str, only: list[str] | None = None) -> list[dict]:
    """What is left of the grid, per (model, local epochs, strategy): runs finished and
    pending, and the pending runs' time estimated from the wall time of the finished
    runs of the same group, or else of the same model and strategy at other local
    epochs, scaled by the epochs (client training dominates a round), or else of the
    finished variant of the same strategy whose settings differ least (fusion-uniform
    like fusion), or else the same strategy's finished runs in the grids next to DIR
    (scaled by rounds, or by rounds x epochs), or else FedAvg's estimate for the same
    model and epochs: a lower bound,
    since every federated strategy trains the same clients and FedAvg's server only
    averages. Runs nothing."""
    grid = load_grid(config, out)
    selected = {run.run_id for run in _select(grid, only)}
    groups: dict[tuple, dict] = {}
    for run in grid.runs:  # estimates draw on every finished run, the slice or not
        task = run.settings.train_task()
        key = (task.model, task.local_epochs, run.strategy)
        if key not in groups:
            groups[key] = {"walls": [], "finished": 0, "pending": 0, "selected": False,
                           "settings": _variant_settings(run), "rounds": run.settings.rounds}
        group = groups[key]
        in_slice = run.run_id in selected
        group["selected"] |= in_slice
        finished = is_finished(run.settings.out)
        if finished:
            group["walls"].append(read_summary(run.settings.out)["wall_s"])
        group["finished" if finished else "pending"] += in_slice

    def from_this_grid(model: str, epochs: int, strategy: str) -> tuple[float | None, str]:
        walls = groups.get((model, epochs, strategy), {}).get("walls")
        if walls:
            return sum(walls) / len(walls), "measured"
        scaled = [wall * epochs / other for (m, other, s), g in groups.items()
                  if (m, s) == (model, strategy) and other != epochs for wall in g["walls"]]
        if scaled:
            return sum(scaled) / len(scaled), "scaled from other local epochs"
        return None, ""

    @functools.cache  # the FedAvg fallback asks again per group; other grids' records are read once
    def from_other_grids(model: str, epochs: int, strategy: str) -> tuple[float | None, str]:
        rounds = groups.get((model, epochs, strategy), {}).get("rounds")
        return _from_other_grids(Path(out), model, strategy, epochs, rounds) if rounds else (None, "")

    lines = []
    for (model, epochs, strategy), group in groups.items():
        if not group["selected"]:
            continue
        per_run, basis = from_this_grid(model, epochs, strategy)
        if per_run is None:  # a variant run here beats the same label run elsewhere, in another regime
            variants = [(len(group["settings"].items() ^ other["settings"].items()), label)
                        for (m, e, label), other in groups.items()
                        if (m, e) == (model, epochs) and other["walls"] and label != strategy
                        and other["settings"]["strategy"] == group["settings"]["strategy"]]
            if variants:
                label = min(variants)[1]
                per_run, basis = from_this_grid(model, epochs, label)[0], f"like {label}'s"
        if per_run is None:
            per_run, basis = from_other_grids(model, epochs, strategy)
        if per_run is None and strategy not in ("fedavg", CENTRALISED):
            per_run, fedavg_basis = from_this_grid(model, epochs, "fedavg")
            if per_run is None:
                per_run, fedavg_basis = from_other_grids(model, epochs, "fedavg")
            if per_run is not None:
                basis = f"at least FedAvg's ({fedavg_basis})"
        lines.append({"model": model, "local_epochs": epochs, "strategy": strategy, "finished": group["finished"],
                      "pending": group["pending"], "minutes_per_run": None if per_run is None else per_run / 60,
                      "pending_hours": None if per_run is None else per_run * group["pending"] / 3600,
                      "basis": basis})
    return lines


def _from_other_grids(out: Path, model: str, strategy: str, epochs: int, rounds: int) -> tuple[float | None, str]:
    """An estimate from the finished runs of the same strategy label and model in the
    grids next to `out` (results/*), at the same local epochs scaled by rounds, or else
    scaled by rounds x local epochs. Returns (seconds per run or None, basis)."""
    found = []  # (local epochs, wall seconds per round, grid)
    for summary in sorted(out.resolve().parent.glob(f"*/runs/*-{strategy}-s[0-9]*/summary.json")):
        grid = summary.parents[2]
        if grid == out.resolve() or not re.fullmatch(rf".+-{re.escape(strategy)}-s\d+", summary.parent.name):
            continue
        try:
            config = json.loads((summary.parent / "config.json").read_text())
            wall = read_summary(summary.parent)["wall_s"]
        except (OSError, ValueError, KeyError):
            continue
        if config.get("model") == model and config.get("rounds") and config.get("local_epochs"):
            found.append((config["local_epochs"], wall / config["rounds"], grid.name))
    same = [f for f in found if f[0] == epochs]
    if same:
        per_run, how = [wall * rounds for _, wall, _ in same], "scaled by rounds"
    elif found:
        per_run, how = [wall * rounds * epochs / e for e, wall, _ in found], "scaled by rounds x epochs"
    else:
        return None, "no finished run to go by"
    sources = sorted({grid for _, _, grid in (same or found)})
    return sum(per_run) / len(per_run), f"from {', '.join(sources)}, {how}"


def _variant_settings(run: GridRun) -> dict:
    """The settings that make a run's strategy variant: all but its seed and folder."""
    return {k: v for k, v in run.settings.to_dict().items() if k not in ("seed", "out")}


def print_plan(lines: list[dict], console) -> None:
    table = Table(title="grid plan: pending runs and their estimated time on this grid's earlier machine(s)")
    for column in ("model", "local epochs", "strategy", "finished", "pending", "min / run", "pending h", "basis"):
        table.add_column(column, justify="left" if column in ("model", "strategy", "basis") else "right")
    for line in lines:
        table.add_row(line["model"], str(line["local_epochs"]), line["strategy"], str(line["finished"]),
                      str(line["pending"]), optional(line["minutes_per_run"], "{:.1f}"),
                      optional(line["pending_hours"], "{:.1f}"), line["basis"])
    known = [line["pending_hours"] for line in lines if line["pending"] and line["pending_hours"] is not None]
    unknown = sum(line["pending"] for line in lines if line["pending"] and line["pending_hours"] is None)
    print_tables(table, console=console)
    pending = sum(line["pending"] for line in lines)
    floors = sum(line["pending"] for line in lines if line["basis"].startswith("at least"))
    console.print(f"pending: {pending} run(s)" + (f", about {sum(known):.1f} h for the {pending - unknown} with an "
                                                   "estimate" if pending > unknown else "")
                  + (f" ({floors} of them at least FedAvg's time: a lower bound)" if floors else "")
                  + (f"; {unknown} without one" if unknown else ""))


def run_grid(config: str, out: str, limit: int | None = None, quiet: bool = False,
             only: list[str] | None = None) -> dict:
    """Run what is missing of the grid (at most `limit` new runs; with `only`, just the
    runs whose id matches one of those glob patterns), then write the outputs from every
    finished run. Returns counts of runs done, kept and failed."""
    grid = load_grid(config, out)  # every setting checked before the first run
    selected = _select(grid, only)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grid.json").write_text(json.dumps({"config": grid.source, "runs": [r.run_id for r in grid.runs],
                                                    "target_accuracy": grid.target_accuracy}, indent=2))
    console = make_console()
    counts = {"done": 0, "kept": 0, "failed": 0}
    pending = [r for r in selected if not is_finished(r.settings.out)]
    counts["kept"] = len(selected) - len(pending)
    if limit is not None:
        pending = pending[:limit]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=quiet) as progress:
        task = progress.add_task("grid", total=len(selected), completed=counts["kept"])
        for run in pending:
            progress.update(task, description=f"{run.run_id}")
            started = time.time()
            try:
                _run_one(run)
                counts["done"] += 1
            except Exception as err:  # noqa: BLE001 - one failed run never stops the grid
                counts["failed"] += 1
                with open(out_dir / "failures.jsonl", "a") as f:
                    f.write(json.dumps({"run": run.run_id, "error": f"{type(err).__name__}: {err}",
                                        "traceback": traceback.format_exc()[-4000:],
                                        "seconds": time.time() - started}) + "\n")
                console.print(f"[red]run {run.run_id} failed:[/red] {type(err).__name__}: {err}")
            progress.advance(task)
    write_outputs(grid, out_dir)
    console.print(f"grid {grid.source}: {counts['done']} run(s) done now, {counts['kept']} kept from before, "
                  f"{counts['failed']} failed; report in {out_dir / 'report.md'}")
    return counts


def main(args) -> int:
    if args.plan:
        print_plan(plan_grid(args.config, args.out, only=args.only), make_console())
        return 0
    counts = run_grid(args.config, args.out, limit=args.limit, quiet=args.quiet, only=args.only)
    return 1 if counts["failed"] else 0
