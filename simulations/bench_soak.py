"""Soak benchmark: a long federation (50 clients, a fifth sampled per round, 30 rounds of
the small CNN) to catch memory that grows with rounds. Prints the resident memory of the
server and its local Ray workers at rounds 5 and 30 (target: under 10% growth) and the
seconds per round."""

from __future__ import annotations

from server.results import read_metrics
from server.settings import RunSettings
from simulations.tables import make_console

HELP = "a long federation: memory at rounds 5 and 30, seconds per round"


def add_arguments(parser) -> None:
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-soak")


def main(args) -> int:
    from simulations.simulate import simulate

    settings = RunSettings.from_mapping({"dataset": args.dataset, "clients": args.clients, "seed": args.seed,
                                         "strategy": args.strategy, "rounds": args.rounds,
                                         "fraction": args.fraction, "out": args.out})
    settings.validate()
    simulate(settings, show_progress=False)
    rows = read_metrics(args.out)
    early = next(r for r in rows if r["round"] == min(5, len(rows)))
    late = rows[-1]
    growth = late["rss_mb"] / early["rss_mb"] - 1
    seconds = [r["round_s"] for r in rows]
    console = make_console()
    console.print(f"{args.strategy}, {args.clients} clients, fraction {args.fraction}, {len(rows)} rounds: "
                  f"memory {early['rss_mb']:.0f} MB at round {early['round']}, {late['rss_mb']:.0f} MB at round "
                  f"{late['round']} ({growth:+.1%}, target < +10%); {sum(seconds) / len(seconds):.2f} s per round; "
                  f"final accuracy {late['accuracy']:.4f}")
    return 0
