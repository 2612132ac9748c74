"""`fedfuse`: run, compare and benchmark federated simulations."""

from __future__ import annotations

import argparse
import importlib
import sys

DEFAULTS_NOTE = "defaults: Fashion-MNIST, Dirichlet alpha 0.5, 10 clients, simple-cnn"


def _run_parser(sub, with_flags: bool) -> None:
    """`fedfuse run`: one flag per declared run setting (server.settings), added only
    when the command is `run` (they import torch and flwr)."""
    p = sub.add_parser("run", help="one federated simulation", description=f"One simulation ({DEFAULTS_NOTE}).")
    if with_flags:
        from server.settings import add_arguments

        add_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's own logs")


def settings_from_args(args: argparse.Namespace):
    """The run settings from `fedfuse run`'s flags: only the flags given (the parser sets
    no defaults), the rest from the declaration."""
    from server.settings import RunSettings

    return RunSettings.from_mapping({k: v for k, v in vars(args).items() if k not in ("command", "quiet", "verbose")})


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


def _lab_names_needed(argv: list[str] | None) -> list[str]:
    """The lab modules whose flags the command line `argv` needs: the one it names, or all
    of them when it names none (`fedfuse lab --help` lists their help lines) or when no
    command line is given (a parser for any)."""
    if argv is None:
        return list(LAB)
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
    """The parser for the command line `argv`: only a `fedfuse lab` one loads lab modules.
    Without `argv`, the parser of every command, lab benchmarks included."""
    parser = argparse.ArgumentParser(prog="fedfuse", description="Federated simulations on Flower: fusion vs FedAvg.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub, with_flags=argv is None or argv[:1] == ["run"])
    _bench_parser(sub)
    _compare_parser(sub)
    _fuse_parser(sub)
    _lab_parser(sub, _lab_names_needed(argv))
    return parser


COMMANDS = {"run": cmd_run, "bench": cmd_bench, "compare": cmd_compare, "fuse": cmd_fuse, "lab": cmd_lab}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
