"""`fedfuse`: run, compare and benchmark federated simulations."""

from __future__ import annotations

import argparse
import importlib
import sys

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
    from server.results import SUMMARY, is_finished
    from simulations.tables import curve_tables, print_tables, summary_table

    missing = [d for d in args.runs if not is_finished(d)]
    if missing:
        return _fail(f"no {SUMMARY} in {', '.join(missing)}: run `fedfuse run --out DIR` first")
    print_tables(*curve_tables(args.runs), summary_table(args.runs, title="comparison"))
    return 0


def _guarded(main, args: argparse.Namespace) -> int:
    """A command's main(args): bad settings, found before any run starts, end in one line."""
    try:
        return main(args)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))


def cmd_fuse(args: argparse.Namespace) -> int:
    from simulations.fuse_checkpoints import main as fuse_main

    return _guarded(fuse_main, args)


def cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import main as bench_main

    return _guarded(bench_main, args)


# The lab benchmarks, `fedfuse lab NAME`: each module holds its HELP line, its flags
# (add_arguments) and main(args). A module is imported only when its command runs or
# `fedfuse lab --help` lists them, so `fedfuse run` never loads them.
LAB = {
    "overhead": "simulations.overhead",
    "projection": "simulations.bench_projection",
    "finetune": "simulations.bench_finetune",
    "fusion": "simulations.bench_fusion",
    "fusion-cost": "simulations.bench_fusion_cost",
    "fusion-round": "simulations.bench_fusion_round",
    "fusion-target": "simulations.bench_fusion_target",
    "soak": "simulations.bench_soak",
}


def cmd_lab(args: argparse.Namespace) -> int:
    return _guarded(importlib.import_module(LAB[args.lab]).main, args)


def _lab_names_needed(argv: list[str]) -> list[str]:
    """The lab modules whose flags this command line needs: the one it names, or all of
    them when it names none (`fedfuse lab --help` lists their help lines)."""
    if argv[:1] != ["lab"]:
        return []
    return argv[1:2] if argv[1:2] and argv[1] in LAB else list(LAB)


def _bench_parser(sub) -> None:
    grid = sub.add_parser("bench", help="a grid of runs from a TOML file: results.csv, report.md, plots")
    grid.add_argument("config", help="grid file, e.g. simulations/configs/smoke.toml")
    grid.add_argument("--out", default="runs/bench", help="grid directory; finished runs in it are kept")
    grid.add_argument("--limit", type=int, default=None, help="run at most this many new runs, then report")
    grid.add_argument("--only", action="append", metavar="GLOB",
                      help="run only the grid runs whose id matches (repeatable), e.g. 'simple-cnn-*-s0'")
    grid.add_argument("--quiet", action="store_true", help="no progress bar")
    grid.add_argument("--plan", action="store_true",
                      help="run nothing: list the pending runs and their time estimated from the finished ones")


def _compare_parser(sub) -> None:
    compare = sub.add_parser("compare", help="tables of finished runs side by side")
    compare.add_argument("runs", nargs="+", help="run directories")


def _fuse_parser(sub) -> None:
    fuse = sub.add_parser("fuse", help="one-shot fusion of trained checkpoints (model.pt files)")
    fuse.add_argument("checkpoints", nargs="+", help="model.pt files of one architecture")
    fuse.add_argument("--out", required=True, help="where to write the fused model.pt")
    fuse.add_argument("--dataset", default="fashion-mnist", help="proxy images come from its training set, test from its test set")
    fuse.add_argument("--data-root", default="")
    fuse.add_argument("--proxy-size", type=int, default=512)
    fuse.add_argument("--seed", type=int, default=0)


def _lab_parser(sub, load: list[str]) -> None:
    lab = sub.add_parser("lab", help="lab benchmarks: speed, projection, fusion alone (fedfuse lab --help)",
                         description="Lab benchmarks: figures of speed and of fusion alone, each with its own "
                                     "flags (fedfuse lab NAME --help).")
    names = lab.add_subparsers(dest="lab", metavar="NAME", required=True)
    for name, module_name in LAB.items():
        if name not in load:
            names.add_parser(name)  # a valid choice; its flags are not needed by this command line
            continue
        module = importlib.import_module(module_name)
        parser = names.add_parser(name, help=module.HELP, description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: only a `fedfuse lab` command line loads lab modules."""
    parser = argparse.ArgumentParser(prog="fedfuse", description="Federated simulations on Flower: fusion vs FedAvg.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _bench_parser(sub)
    _compare_parser(sub)
    _fuse_parser(sub)
    _lab_parser(sub, _lab_names_needed(sys.argv[1:] if argv is None else argv))
    return parser


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "compare": cmd_compare, "fuse": cmd_fuse, "lab": cmd_lab}


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
