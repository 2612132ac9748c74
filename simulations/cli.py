"""`fedfuse`: run, compare and benchmark federated simulations."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

DEFAULTS_NOTE = "defaults: Fashion-MNIST, Dirichlet alpha 0.5, 10 clients, simple-cnn"


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="one federated simulation", description=f"One simulation ({DEFAULTS_NOTE}).")
    p.add_argument("--strategy", default="fedavg", help="fedavg, fedprox or fusion (neuron-centric fusion)")
    p.add_argument("--attribution", default="gradxact",
                   help="fusion's neuron scores, computed by each client on its shard: gradxact, conductance, "
                        "or uniform (plain neuron-centric fusion)")
    p.add_argument("--attribution-samples", type=int, default=256, help="client samples used for attributions")
    p.add_argument("--fusion-check", default="clients",
                   help="fusion sends the fused model only if it beats the average: in accuracy on the clients' "
                        "data (clients), in agreement with their ensemble on held-out proxy samples (proxy), "
                        "or always (off)")
    p.add_argument("--check-samples", type=int, default=500, help="fusion check: examples per client")
    p.add_argument("--fusion-rounds", type=int, default=0,
                   help="fusion: fuse in the first N rounds only, then average as FedAvg does (0: every round)")
    p.add_argument("--share-class-counts", action=argparse.BooleanOptionalAction, default=True,
                   help="fusion: clients send their class histogram, which weighs the head's targets")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, cifar10, mnist-5k, digits, synthetic")
    p.add_argument("--data-root", default="", help="folder of the dataset's files (default: its offline location)")
    p.add_argument("--download", action="store_true", help="allow downloading the dataset (online only)")
    p.add_argument("--partition", default="dirichlet", help="iid, dirichlet or pathological")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed")
    p.add_argument("--classes-per-client", type=int, default=2, help="#C for the pathological partition")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--fraction", type=float, default=1.0, help="share of clients sampled per round")
    p.add_argument("--min-clients", type=int, default=1, help="sample at least this many clients per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx's mu")
    p.add_argument("--model", default="simple-cnn")
    p.add_argument("--projection", action=argparse.BooleanOptionalAction, default=None,
                   help="train projected convolutions: one scale per channel pair over frozen kernels "
                        "(default: on for pretrained backbones)")
    p.add_argument("--pointwise", default="freeze", help="projection's policy for 1x1 convs: project, freeze or train")
    p.add_argument("--full-finetune-rounds", type=int, default=0,
                   help="after the projected rounds, fold the model and fine-tune every weight for K more rounds")
    p.add_argument("--full-finetune-lr", type=float, default=0.0, help="learning rate after folding (0: --lr)")
    p.add_argument("--resolution", type=int, default=0, help="input side in pixels for ImageNet backbones (0: model default)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random initial weights")
    p.add_argument("--weights", default="", help="local checkpoint for a timm:NAME model")
    p.add_argument("--proxy-size", type=int, default=1000, help="training samples held out as the server's unlabeled proxy set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/latest", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete round")
    p.add_argument("--client-cpus", type=float, default=1.0, help="CPUs Ray reserves per client (and torch threads)")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per client: 0.5 puts two clients on a GPU")
    p.add_argument("--ray-address", default="", help="join a running Ray cluster ('auto' or HOST:PORT)")
    p.add_argument("--ray-num-cpus", type=int, default=0, help="CPUs of the local Ray instance (0: all)")
    p.add_argument("--ray-num-gpus", type=float, default=-1.0, help="GPUs Ray declares locally (-1: detect)")
    p.add_argument("--client-failure-rate", type=float, default=0.0,
                   help="fault injection: each sampled client crashes with this probability (seeded)")
    p.add_argument("--poison-clients", type=int, default=0, help="fault injection: this many clients send broken updates")
    p.add_argument("--poison", default="nan", help="their kind of broken update: nan, inf, scale, shape")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's own logs")


def settings_from_args(args: argparse.Namespace):
    from data import FederationSpec
    from server.settings import RunSettings, default_projection

    federation = FederationSpec(
        dataset=args.dataset, partition=args.partition, alpha=args.alpha,
        classes_per_client=args.classes_per_client, clients=args.clients, proxy_size=args.proxy_size,
        seed=args.seed, data_root=args.data_root, download=args.download,
    )
    return RunSettings(
        federation=federation, strategy=args.strategy, model=args.model, pretrained=args.pretrained,
        weights=args.weights, pointwise=args.pointwise, resolution=args.resolution,
        full_finetune_rounds=args.full_finetune_rounds, full_finetune_lr=args.full_finetune_lr,
        projection=default_projection(args.model, args.pretrained) if args.projection is None else args.projection,
        rounds=args.rounds, fraction=args.fraction, min_clients=args.min_clients,
        local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, proximal_mu=args.proximal_mu, attribution=args.attribution,
        attribution_samples=args.attribution_samples, fusion_check=args.fusion_check,
        check_samples=args.check_samples, fusion_rounds=args.fusion_rounds, share_class_counts=args.share_class_counts,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus, ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
        ray_num_gpus=args.ray_num_gpus, out=args.out, resume=args.resume,
        client_failure_rate=args.client_failure_rate, poison_clients=args.poison_clients, poison=args.poison,
    )


def _fail(message: str) -> int:
    print(f"fedfuse: error: {message}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:

    from data import build_federation
    from simulations.simulate import simulate
    from simulations.tables import (
        histogram_table,
        make_console,
        print_tables,
        summary_table,
    )

    try:  # every check happens here, before Ray starts and before --out is touched
        settings = settings_from_args(args)
        settings.validate()
        federation = build_federation(settings.federation)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    console = make_console()
    if not args.quiet:
        print_tables(histogram_table(federation.histogram()), console=console)
    simulate(settings, show_progress=not args.quiet, verbose=args.verbose)
    print_tables(summary_table([settings.out], title=f"fedfuse run -> {settings.out}"), console=console)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from simulations.tables import curve_table, print_tables, summary_table

    missing = [d for d in args.runs if not (Path(d) / "summary.json").exists()]
    if missing:
        return _fail(f"no summary.json in {', '.join(missing)}: run `fedfuse run --out DIR` first")
    print_tables(curve_table(args.runs), summary_table(args.runs, title="comparison"))
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from simulations.fuse_checkpoints import main as fuse_main

    try:
        return fuse_main(args)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))


# Benchmarks: each module's main(args), imported only when its command runs.
BENCHMARKS = {
    "bench": "simulations.bench",
    "bench-overhead": "simulations.overhead",
    "bench-projection": "simulations.bench_projection",
    "bench-finetune": "simulations.bench_finetune",
    "bench-fusion": "simulations.bench_fusion",
    "bench-fusion-cost": "simulations.bench_fusion_cost",
    "bench-fusion-round": "simulations.bench_fusion_round",
    "bench-fusion-target": "simulations.bench_fusion_target",
    "bench-soak": "simulations.bench_soak",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedfuse", description="Federated simulations on Flower: fusion vs FedAvg.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    grid = sub.add_parser("bench", help="a grid of runs from a TOML file: results.csv, report.md, plots")
    grid.add_argument("config", help="grid file, e.g. simulations/configs/smoke.toml")
    grid.add_argument("--out", default="runs/bench", help="grid directory; finished runs in it are kept")
    grid.add_argument("--limit", type=int, default=None, help="run at most this many new runs, then report")
    grid.add_argument("--only", action="append", metavar="GLOB",
                      help="run only the grid runs whose id matches (repeatable), e.g. 'simple-cnn-*-s0'")
    grid.add_argument("--quiet", action="store_true", help="no progress bar")
    grid.add_argument("--plan", action="store_true",
                      help="run nothing: list the pending runs and their time estimated from the finished ones")
    compare = sub.add_parser("compare", help="tables of finished runs side by side")
    compare.add_argument("runs", nargs="+", help="run directories")
    overhead = sub.add_parser("bench-overhead", help="Flower+Ray round time against a plain training loop")
    overhead.add_argument("--clients", type=int, default=10)
    overhead.add_argument("--rounds", type=int, default=3)
    overhead.add_argument("--dataset", default="fashion-mnist")
    overhead.add_argument("--out", default="runs/bench-overhead")
    projection = sub.add_parser("bench-projection", help="projection's sizes and step time against plain fine-tuning")
    projection.add_argument("--resolution", type=int, default=64)
    projection.add_argument("--batch-size", type=int, default=32)
    projection.add_argument("--repeats", type=int, default=15)
    projection.add_argument("--threads", type=int, default=1)
    finetune = sub.add_parser("bench-finetune", help="projected vs projected-then-full vs full fine-tuning")
    finetune.add_argument("--model", default="efficientnet-lite0")
    finetune.add_argument("--dataset", default="fashion-mnist")
    finetune.add_argument("--alpha", type=float, default=0.5)
    finetune.add_argument("--clients", type=int, default=10)
    finetune.add_argument("--fraction", type=float, default=0.5)
    finetune.add_argument("--rounds", type=int, default=3, help="rounds of every variant")
    finetune.add_argument("--full-rounds", type=int, default=1, help="last rounds of full fine-tuning after projection")
    finetune.add_argument("--resolution", type=int, default=64)
    finetune.add_argument("--lr", type=float, default=0.01, help="learning rate of full fine-tuning")
    finetune.add_argument("--projected-lr", type=float, default=0.05, help="learning rate of projected rounds")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--out", default="runs/bench-finetune")
    finetune.add_argument("--force", action="store_true", help="rerun variants that finished earlier")
    fusion = sub.add_parser("bench-fusion", help="zero-shot fusion vs averaging vs ensemble")
    fusion.add_argument("--model", default="simple-cnn")
    fusion.add_argument("--projection", action="store_true")
    fusion.add_argument("--resolution", type=int, default=0)
    fusion.add_argument("--dataset", default="fashion-mnist")
    fusion.add_argument("--models", type=int, default=2)
    fusion.add_argument("--epochs", type=int, default=8)
    fusion.add_argument("--lr", type=float, default=0.01)
    fusion.add_argument("--splits", default="classes,dirichlet", help="classes (disjoint class sets), dirichlet (alpha 0.1)")
    fusion.add_argument("--inits", default="independent,shared",
                        help="independent (each model its own random init) and/or shared (one init, the federated case)")
    fusion.add_argument("--proxy-size", type=int, default=512)
    fusion.add_argument("--test-size", type=int, default=10000)
    fusion.add_argument("--threads", type=int, default=1)
    fusion.add_argument("--seed", type=int, default=0)
    cost = sub.add_parser("bench-fusion-cost", help="fusion seconds for 2..16 models; closed-form vs gradient fits")
    cost.add_argument("--model", default="simple-cnn")
    cost.add_argument("--projection", action="store_true")
    cost.add_argument("--resolution", type=int, default=0)
    cost.add_argument("--counts", default="2,4,8,16")
    cost.add_argument("--proxy-size", type=int, default=512)
    cost.add_argument("--threads", type=int, default=1)
    per_round = sub.add_parser("bench-fusion-round", help="fusion vs FedAvg in a federation: accuracy and fusion time per round")
    per_round.add_argument("--model", default="simple-cnn")
    per_round.add_argument("--resolution", type=int, default=0)
    per_round.add_argument("--dataset", default="fashion-mnist")
    per_round.add_argument("--alpha", type=float, default=0.1)
    per_round.add_argument("--clients", type=int, default=10)
    per_round.add_argument("--rounds", type=int, default=10)
    per_round.add_argument("--local-epochs", type=int, default=1)
    per_round.add_argument("--lr", type=float, default=0.01)
    per_round.add_argument("--attribution", default="gradxact")
    per_round.add_argument("--proxy-size", type=int, default=1000)
    per_round.add_argument("--seed", type=int, default=0)
    per_round.add_argument("--out", default="runs/bench-fusion-round")
    per_round.add_argument("--force", action="store_true", help="rerun federations that finished earlier")
    target = sub.add_parser("bench-fusion-target",
                            help="per FedAvg round: the average against the class-weighted ensemble fusion fits")
    target.add_argument("--model", default="simple-cnn")
    target.add_argument("--resolution", type=int, default=0)
    target.add_argument("--dataset", default="fashion-mnist")
    target.add_argument("--partition", default="dirichlet")
    target.add_argument("--alpha", type=float, default=0.1)
    target.add_argument("--classes-per-client", type=int, default=2)
    target.add_argument("--clients", type=int, default=10)
    target.add_argument("--rounds", type=int, default=10)
    target.add_argument("--local-epochs", type=int, default=1)
    target.add_argument("--lr", type=float, default=0.01)
    target.add_argument("--test-size", type=int, default=10000)
    target.add_argument("--threads", type=int, default=1)
    target.add_argument("--seed", type=int, default=0)
    target.add_argument("--out", default="runs/bench-fusion-target")
    soak = sub.add_parser("bench-soak", help="a long federation: memory at rounds 5 and 30, seconds per round")
    soak.add_argument("--strategy", default="fedavg")
    soak.add_argument("--dataset", default="fashion-mnist")
    soak.add_argument("--clients", type=int, default=50)
    soak.add_argument("--fraction", type=float, default=0.2)
    soak.add_argument("--rounds", type=int, default=30)
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--out", default="runs/bench-soak")
    fuse = sub.add_parser("fuse", help="one-shot fusion of trained checkpoints (model.pt files)")
    fuse.add_argument("checkpoints", nargs="+", help="model.pt files of one architecture")
    fuse.add_argument("--out", required=True, help="where to write the fused model.pt")
    fuse.add_argument("--dataset", default="fashion-mnist", help="proxy images come from its training set, test from its test set")
    fuse.add_argument("--data-root", default="")
    fuse.add_argument("--proxy-size", type=int, default=512)
    fuse.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in BENCHMARKS:
        module = importlib.import_module(BENCHMARKS[args.command])
        try:
            return module.main(args)
        except (ValueError, FileNotFoundError) as err:  # bad settings, found before any run starts
            return _fail(str(err))
    handler = {"run": cmd_run, "compare": cmd_compare, "fuse": cmd_fuse}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
