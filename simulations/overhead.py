"""Benchmark: Flower+Ray round time against the same training in a plain Python loop.

Both sides do the same work per round: every client trains one local epoch from the
global state, the states are averaged by example count in partition order, and the
global model is evaluated on the test set. Round 1 carries start-up costs (Ray actors,
dataset loading) on the Flower side, so the ratio is taken over rounds 2..R."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.table import Table

import models
from clients import runtime, training
from clients.local_update import local_update
from data import BatchLoader, FederationSpec, build_federation
from server.results import read_jsonl
from server.settings import RunSettings
from simulations.tables import make_console


def plain_loop(settings: RunSettings) -> list[dict]:
    """The federation's rounds in one process, clients one after another."""
    runtime.configure_threads(os.cpu_count() or 1)
    task = settings.train_task()
    federation = build_federation(settings.federation)
    model = task.build_model(federation.num_classes)
    test = BatchLoader(federation.data.test_images, federation.data.test_labels,
                       task.input_spec(federation.data), batch_size=250)
    global_state = models.exchanged_state(model)
    rows = []
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        round_task = replace(task, server_round=server_round)
        updates = [local_update(round_task, pid, global_state) for pid in range(settings.federation.clients)]
        weights = np.array([u.metrics["num-examples"] for u in updates], dtype=np.float64)
        weights /= weights.sum()
        global_state = {k: sum(w * u.state[k] for w, u in zip(weights, updates)).astype(v.dtype)
                        for k, v in global_state.items()}
        models.load_exchanged_state(model, global_state)
        accuracy = training.evaluate(model, test)["accuracy"]
        rows.append({"round": server_round, "accuracy": accuracy, "round_s": time.perf_counter() - started})
    return rows


def main(args) -> int:
    from simulations.simulate import simulate

    out = Path(args.out)
    settings = RunSettings(
        federation=FederationSpec(dataset=args.dataset, clients=args.clients),
        rounds=args.rounds, out=str(out / "flower"),
    )
    settings.validate()
    console = make_console()
    console.print(f"Flower+Ray: {args.clients} clients, {args.rounds} rounds on {args.dataset} ...")
    simulate(settings, show_progress=False)
    flower = read_jsonl(out / "flower" / "metrics.jsonl")
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
