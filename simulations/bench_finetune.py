"""Benchmark: projection as initialisation for full fine-tuning.

Three federations on the same split and seed, with the same number of rounds:
projected throughout, projected then folded and fully fine-tuned for the last K
rounds, and full fine-tuning from the start. Prints accuracy per round and the bytes
each sent."""

from __future__ import annotations

from pathlib import Path

from server.settings import RunSettings
from simulations.tables import curve_table, make_console, print_tables, summary_table

HELP = "projected vs projected-then-full vs full fine-tuning"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant")
    parser.add_argument("--full-rounds", type=int, default=1, help="last rounds of full fine-tuning after projection")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of full fine-tuning")
    parser.add_argument("--projected-lr", type=float, default=0.05, help="learning rate of projected rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-finetune")
    parser.add_argument("--force", action="store_true", help="rerun variants that finished earlier")


def variants(base: dict, rounds: int, full_rounds: int, projected_lr: float) -> dict[str, RunSettings]:
    """The three federations from the flat settings `base` (its `lr`: full fine-tuning's)."""
    out = Path(base["out"])
    return {
        "projected": RunSettings.from_mapping({**base, "projection": True, "rounds": rounds, "lr": projected_lr,
                                               "out": str(out / "projected")}),
        "projected-then-full": RunSettings.from_mapping({
            **base, "projection": True, "rounds": rounds - full_rounds, "full_finetune_rounds": full_rounds,
            "lr": projected_lr, "full_finetune_lr": base["lr"], "out": str(out / "projected-then-full")}),
        "full": RunSettings.from_mapping({**base, "projection": False, "rounds": rounds, "out": str(out / "full")}),
    }


def _describe(name: str, settings: RunSettings) -> str:
    full_rounds = settings.total_rounds - settings.rounds
    if settings.train_task().projection:
        return f"{name}: {settings.rounds} projected + {full_rounds} full rounds"
    return f"{name}: {settings.rounds} full fine-tuning rounds"


def main(args) -> int:
    from simulations.simulate import run_unless_finished

    base = {"dataset": args.dataset, "partition": "dirichlet", "alpha": args.alpha, "clients": args.clients,
            "seed": args.seed, "model": args.model, "resolution": args.resolution, "fraction": args.fraction,
            "lr": args.lr, "out": args.out}
    runs = variants(base, args.rounds, args.full_rounds, args.projected_lr)
    for settings in runs.values():
        settings.validate()
    console = make_console()
    run_unless_finished(runs, args.force, console, _describe)
    dirs = [s.out for s in runs.values()]
    print_tables(curve_table(dirs), summary_table(dirs, title=f"{args.model} at {args.resolution}px"), console=console)
    return 0
