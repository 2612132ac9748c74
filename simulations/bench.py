"""`fedfuse bench CONFIG.toml --out DIR`: run a grid of federations (and the centralised
references), then write DIR/results.csv, DIR/report.md and the plots.

Runs that finished earlier in DIR (their summary.json exists) are kept, so an
interrupted grid continues where it stopped; a run that fails is recorded in
DIR/failures.jsonl and the grid goes on."""

from __future__ import annotations

import fnmatch
import json
import time
import traceback
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from simulations.grid import CENTRALISED, GridRun, load_grid
from simulations.report import write_outputs
from simulations.tables import make_console


def _finished(run: GridRun) -> bool:
    return (Path(run.settings.out) / "summary.json").exists()


def _run_one(run: GridRun) -> None:
    if run.strategy == CENTRALISED:
        from simulations.centralised import run_centralised

        run_centralised(run.settings)
    else:
        from simulations.simulate import simulate

        simulate(run.settings, show_progress=False)


def run_grid(config: str, out: str, limit: int | None = None, quiet: bool = False,
             only: list[str] | None = None) -> dict:
    """Run what is missing of the grid (at most `limit` new runs; with `only`, just the
    runs whose id matches one of those glob patterns), then write the outputs from every
    finished run. Returns counts of runs done, kept and failed."""
    grid = load_grid(config, out)  # every setting checked before the first run
    selected = grid.runs
    if only:
        # A slice of the grid (one model, one seed...): several machines or sessions can
        # share one grid directory, each running its own part.
        matched = {p: {r.run_id for r in grid.runs if fnmatch.fnmatchcase(r.run_id, p)} for p in only}
        unknown = [p for p, ids in matched.items() if not ids]
        if unknown:
            raise ValueError(f"--only {' '.join(unknown)} matches no run of {config}; run ids look like "
                             f"{grid.runs[-1].run_id}")
        selected = [r for r in grid.runs if any(r.run_id in ids for ids in matched.values())]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grid.json").write_text(json.dumps({"config": grid.source, "runs": [r.run_id for r in grid.runs],
                                                    "target_accuracy": grid.target_accuracy}, indent=2))
    console = make_console()
    counts = {"done": 0, "kept": 0, "failed": 0}
    pending = [r for r in selected if not _finished(r)]
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
    counts = run_grid(args.config, args.out, limit=args.limit, quiet=args.quiet, only=args.only)
    return 1 if counts["failed"] else 0
