"""Benchmark: Flower+Ray round time against the same training in a plain Python loop.

Both sides do the same work per round: every client trains one local epoch from the
global state, the states are averaged by example count in partition order, and the
global model is evaluated on the test set. Round 1 carries start-up costs (Ray actors,
dataset loading) on the Flower side, so the ratio is taken over rounds 2..R."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from rich.table import Table

import models
from clients import runtime, training
from data import BatchLoader, build_federation
from server.results import read_metrics
from server.settings import RunSettings
from simulations.inprocess import fedavg_rounds
from simulations.tables import make_console

HELP = "Flower+Ray round time against a plain training loop"


def add_arguments(parser) -> None:
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", default="runs/bench-overhead")


def plain_loop(settings: RunSettings) -> list[dict]:
    """The federation's rounds in one process, clients one after another."""
    runtime.configure_threads(os.cpu_count() or 1)
    task = settings.train_task()
    federation = build_federation(settings.federation)
    model = task.build_model(federation.num_classes)
    test = BatchLoader(federation.data.test_images, federation.data.test_labels,
                       task.input_spec(federation.data), batch_size=250)
    rows = []
    started = time.perf_counter()  # a round's time: its clients' training, the average and the test
    for fedavg_round in fedavg_rounds(task, models.exchanged_state(model), settings.rounds):
        models.load_exchanged_state(model, fedavg_round.state)
        accuracy = training.evaluate(model, test)["accuracy"]
        rows.append({"round": fedavg_round.number, "accuracy": accuracy, "round_s": time.perf_counter() - started})
        started = time.perf_counter()
    return rows


def main(args) -> int:
    from simulations.simulate import simulate

    out = Path(args.out)
    settings = RunSettings.from_mapping({"dataset": args.dataset, "clients": args.clients, "rounds": args.rounds,
                                         "out": str(out / "flower")})
    settings.validate()
    console = make_console()
    console.print(f"Flower+Ray: {args.clients} clients, {args.rounds} rounds on {args.dataset} ...")
    simulate(settings, show_progress=False)
    flower = read_metrics(out / "flower")
    console.print("plain loop ...")
    plain = plain_loop(settings)

    table = Table(title=f"round time, {args.clients} clients, {os.cpu_count()} CPUs")
    for col in ("round", "flower s", "plain s", "flower acc", "plain acc"):
        table.add_column(col, justify="right")
    for f, p in zip(flower, plain):
        table.add_row(str(f["round"]), f"{f['round_s']:.2f}", f"{p['round_s']:.2f}",
                      f"{f['accuracy']:.4f}", f"{p['accuracy']:.4f}")
    console.print(table)
    steady = slice(1, None) if len(flower) > 1 else slice(None)
    flower_s = float(np.mean([r["round_s"] for r in flower[steady]]))
    plain_s = float(np.mean([r["round_s"] for r in plain[steady]]))
    console.print(f"steady-state round time: Flower+Ray {flower_s:.2f}s, plain loop {plain_s:.2f}s, "
                  f"ratio {flower_s / plain_s:.2f}x (target <= 1.3x)")
    return 0
