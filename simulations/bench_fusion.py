"""Benchmark: zero-shot fusion against weight averaging and the output ensemble.

N models of one architecture are trained on disjoint class sets (or Dirichlet shards)
of a dataset, from independent initialisations (classic model fusion) or one shared
initialisation (the federated case). The table gives the test accuracy of each model,
of vanilla weight averaging, of the output ensemble, and of fusion with uniform and
with attribution-weighted matching."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import numpy as np
import torch
from rich.table import Table

import data
from clients import training
from clients.task import TrainTask
from simulations.tables import make_console
from strategies.fusion import average_models, fuse, neuron_attributions

HELP = "zero-shot fusion vs averaging vs ensemble"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--projection", action="store_true")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--splits", default="classes,dirichlet",
                        help="classes (disjoint class sets), dirichlet (alpha 0.1)")
    parser.add_argument("--inits", default="independent,shared",
                        help="independent (each model its own random init) and/or shared (one init, the federated case)")
    parser.add_argument("--proxy-size", type=int, default=512)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def class_split_shards(labels: np.ndarray, num_models: int, num_classes: int) -> list[np.ndarray]:
    groups = np.array_split(np.arange(num_classes), num_models)
    return [np.flatnonzero(np.isin(labels, g)) for g in groups]


def run_setting(args, shared_init: bool, split: str) -> dict:
    ds = data.load(args.dataset)
    task = TrainTask(federation=data.FederationSpec(seed=args.seed), model=args.model, projection=args.projection,
                     resolution=args.resolution, lr=args.lr, batch_size=64)
    spec = task.input_spec(ds)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(ds.train_labels))
    proxy_idx, pool = order[:args.proxy_size], order[args.proxy_size:]
    labels = ds.train_labels[pool]
    if split == "classes":
        shards = class_split_shards(labels, args.models, ds.num_classes)
    else:
        shards = data.partition(labels, "dirichlet", args.models, alpha=0.1, seed=args.seed)
    test = data.BatchLoader(ds.test_images[:args.test_size], ds.test_labels[:args.test_size], spec, 500)
    proxy = data.BatchLoader(ds.train_images[proxy_idx], None, spec, 256)

    start = task.build_model(ds.num_classes)
    trained, scores = [], []
    for i, shard in enumerate(shards):
        if not shared_init:  # build_model is seeded by the federation seed: give each model its own
            start = replace(task, federation=replace(task.federation, seed=args.seed + 1 + i)).build_model(ds.num_classes)
        model = copy.deepcopy(start)
        loader = data.BatchLoader(ds.train_images[pool[shard]], labels[shard], spec, 64, shuffle=True, seed=i)
        training.train(model, loader, args.epochs, args.lr)
        model.eval()
        trained.append(model)
        scores.append(neuron_attributions(model, loader, "gradxact", max_samples=256))

    row = {f"model {i}": training.evaluate(m, test)["accuracy"] for i, m in enumerate(trained)}
    row["average"] = training.evaluate(average_models(trained), test)["accuracy"]
    row["ensemble"] = training.ensemble_accuracy(trained, test)
    started = time.perf_counter()
    fused_uniform, _ = fuse(trained, proxy, seed=args.seed)
    row["fusion s"] = time.perf_counter() - started
    row["fusion (uniform)"] = training.evaluate(fused_uniform, test)["accuracy"]
    fused_attr, report = fuse(trained, proxy, attributions=scores, seed=args.seed)
    row["fusion (attribution)"] = training.evaluate(fused_attr, test)["accuracy"]
    return row


def main(args) -> int:
    torch.set_num_threads(args.threads)
    console = make_console()
    table = Table(title=f"zero-shot fusion, {args.model}{' (projected)' if args.projection else ''}, "
                        f"{args.models} models, {args.epochs} epochs, proxy {args.proxy_size}, {args.dataset}")
    columns = None
    for split in args.splits.split(","):
        for shared in [init == "shared" for init in args.inits.split(",")]:
            row = run_setting(args, shared, split)
            if columns is None:
                columns = ["split", "init"] + list(row)
                for c in columns:
                    table.add_column(c, justify="left" if c in ("split", "init") else "right")
            table.add_row(split, "shared" if shared else "independent",
                          *[f"{v:.2f}" if k == "fusion s" else f"{v:.4f}" for k, v in row.items()])
            console.print(f"{split}, {'shared' if shared else 'independent'} init: " +
                          ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    console.print(table)
    return 0
