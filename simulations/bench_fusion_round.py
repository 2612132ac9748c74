"""Benchmark: NeuronFusion against FedAvg in a federation, round by round.

Two federations on the same split and seed (FedAvg, then fusion), then per round: test
accuracy of both, the clients' training wall time of the fusion round, the seconds the
server spent fusing, their ratio (target: at most 0.5 at 10 clients), FedAvg's
aggregation seconds beside it, and which model the fusion round sent out."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from server.results import read_metrics
from server.settings import RunSettings
from simulations.tables import curve_table, make_console, print_tables, summary_table

HELP = "fusion vs FedAvg in a federation: accuracy and fusion time per round"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--attribution", default="gradxact")
    parser.add_argument("--proxy-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-fusion-round")
    parser.add_argument("--force", action="store_true", help="rerun federations that finished earlier")


def main(args) -> int:
    from simulations.simulate import run_unless_finished

    base = {  # projection follows the model, as in `fedfuse run`
        "dataset": args.dataset, "partition": "dirichlet", "alpha": args.alpha, "clients": args.clients,
        "proxy_size": args.proxy_size, "seed": args.seed, "model": args.model, "resolution": args.resolution,
        "rounds": args.rounds, "local_epochs": args.local_epochs, "lr": args.lr, "attribution": args.attribution,
    }
    runs = {name: RunSettings.from_mapping({**base, "strategy": name, "out": str(Path(args.out) / name)})
            for name in ("fedavg", "fusion")}
    for settings in runs.values():
        settings.validate()
    console = make_console()
    run_unless_finished(runs, args.force, console)

    fedavg = {m["round"]: m for m in read_metrics(runs["fedavg"].out)}
    fusion = read_metrics(runs["fusion"].out)
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
