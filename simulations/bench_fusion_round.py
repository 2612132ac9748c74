"""Benchmark: NeuronFusion against FedAvg in a federation, round by round.

Two federations on the same split and seed (FedAvg, then fusion), then per round: test
accuracy of both, the clients' training wall time of the fusion round, the seconds the
server spent fusing, their ratio (target: at most 0.5 at 10 clients), FedAvg's
aggregation seconds beside it, and which model the fusion round sent out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.table import Table

from data import FederationSpec
from server.results import read_jsonl
from server.settings import RunSettings, default_projection
from simulations.tables import curve_table, make_console, print_tables, summary_table


def main(args) -> int:
    from simulations.simulate import run_unless_finished

    base = RunSettings(
        federation=FederationSpec(dataset=args.dataset, partition="dirichlet", alpha=args.alpha,
                                  clients=args.clients, proxy_size=args.proxy_size, seed=args.seed),
        model=args.model, projection=default_projection(args.model, True), resolution=args.resolution,
        rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr, attribution=args.attribution,
    )
    runs = {name: replace(base, strategy=name, out=str(Path(args.out) / name)) for name in ("fedavg", "fusion")}
    for settings in runs.values():
        settings.validate()
    console = make_console()
    run_unless_finished(runs, args.force, console)

    fedavg = {m["round"]: m for m in read_jsonl(Path(runs["fedavg"].out) / "metrics.jsonl")}
    fusion = read_jsonl(Path(runs["fusion"].out) / "metrics.jsonl")
    table = Table(title=f"fusion vs FedAvg per round: {args.model}, Dirichlet {args.alpha}, {args.clients} clients")
    for col in ("round", "FedAvg acc", "fusion acc", "client training s", "fusion s", "fusion / training",
                "FedAvg aggregate s", "sent"):
        table.add_column(col, justify="right")
    ratios = []
    for m in fusion:
        training_s = m["round_s"] - m["aggregate_s"]
        ratios.append(m["aggregate_s"] / training_s)
        avg = fedavg.get(m["round"], {})
        table.add_row(str(m["round"]), f"{avg.get('accuracy', float('nan')):.4f}", f"{m['accuracy']:.4f}",
                      f"{training_s:.1f}", f"{m['aggregate_s']:.1f}", f"{ratios[-1]:.2f}",
                      f"{avg.get('aggregate_s', float('nan')):.3f}", m.get("selected", "fusion"))
    console.print(table)
    console.print(f"fusion seconds / client training seconds: mean {sum(ratios) / len(ratios):.2f}, "
                  f"max {max(ratios):.2f} (target <= 0.5)")
    dirs = [s.out for s in runs.values()]
    print_tables(curve_table(dirs), summary_table(dirs, title="fusion vs FedAvg"), console=console)
    return 0
