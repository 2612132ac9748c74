"""Benchmark: projection as initialisation for full fine-tuning.

Three federations on the same split and seed, with the same number of rounds:
projected throughout, projected then folded and fully fine-tuned for the last K
rounds, and full fine-tuning from the start. Prints accuracy per round and the bytes
each sent."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from data import FederationSpec
from server.settings import RunSettings
from simulations.tables import curve_table, make_console, print_tables, summary_table


def variants(base: RunSettings, rounds: int, full_rounds: int, projected_lr: float) -> dict[str, RunSettings]:
    out = Path(base.out)
    return {
        "projected": replace(base, projection=True, rounds=rounds, lr=projected_lr, out=str(out / "projected")),
        "projected-then-full": replace(base, projection=True, rounds=rounds - full_rounds,
                                       full_finetune_rounds=full_rounds, lr=projected_lr, full_finetune_lr=base.lr,
                                       out=str(out / "projected-then-full")),
        "full": replace(base, projection=False, rounds=rounds, out=str(out / "full")),
    }


def main(args) -> int:
    from simulations.simulate import run_unless_finished

    base = RunSettings(
        federation=FederationSpec(dataset=args.dataset, partition="dirichlet", alpha=args.alpha,
                                  clients=args.clients, seed=args.seed),
        model=args.model, resolution=args.resolution, fraction=args.fraction, lr=args.lr, out=args.out,
    )
    runs = variants(base, args.rounds, args.full_rounds, args.projected_lr)
    for settings in runs.values():
        settings.validate()
    console = make_console()
    run_unless_finished(runs, args.force, console, lambda name, settings: (
        f"{name}: {settings.rounds} projected + {settings.full_finetune_rounds} full rounds"
        if settings.projection else f"{name}: {settings.rounds} full fine-tuning rounds"))
    dirs = [s.out for s in runs.values()]
    print_tables(curve_table(dirs), summary_table(dirs, title=f"{args.model} at {args.resolution}px"), console=console)
    return 0
