"""Soak benchmark: a long federation (50 clients, a fifth sampled per round, 30 rounds of
the small CNN) to catch memory that grows with rounds. Prints the resident memory of the
server and its local Ray workers at rounds 5 and 30 (target: under 10% growth) and the
seconds per round."""

from __future__ import annotations

from data import FederationSpec
from server.results import read_jsonl
from server.settings import RunSettings
from simulations.tables import make_console


def main(args) -> int:
    from pathlib import Path

    from simulations.simulate import simulate

    settings = RunSettings(
        federation=FederationSpec(dataset=args.dataset, clients=args.clients, seed=args.seed),
        strategy=args.strategy, rounds=args.rounds, fraction=args.fraction, out=args.out,
    )
    settings.validate()
    simulate(settings, show_progress=False)
    rows = read_jsonl(Path(args.out) / "metrics.jsonl")
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
