"""Benchmark: what fusion aims at, against what FedAvg reaches, round by round.

A FedAvg federation (the clients' own training code, the same partition as `fedfuse
run`, in one process without Flower or Ray). After every round's client training, the
test accuracy of: FedAvg's weighted average of the clients' models; their output
ensemble (mean softmax, the reports' reference); and the class-weighted mean of their
logits, which is the target fusion fits its head to (`head_targets`); and the fused
model itself (the server's fusion of the same updates, before its check), with the
share of test images on which its prediction is the target's. Fusion reproduces that
target closely, so it can only beat averaging in rounds where the target beats the
average."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
from rich.table import Table

import data
import models
from clients.local_update import local_update
from clients.task import TrainTask
from server.settings import RunSettings, default_projection
from simulations.tables import make_console, print_tables
from strategies.fusion import average_models, fuse, head_targets


@torch.no_grad()
def round_figures(client_models: list, sizes: list[int], counts: torch.Tensor, fused, test) -> tuple[dict, object]:
    """Test accuracy of the average, the output ensemble, fusion's head target (class
    `counts`: models x classes) and the fused model, and how often the fused model
    predicts what the target does; and the average itself."""
    average = average_models(client_models, sizes).eval()
    hits = {"average": 0, "ensemble": 0, "fusion_target": 0, "fused": 0, "fused_agrees": 0}
    seen = 0
    for inputs, labels in test:
        logits = [m.eval()(inputs) for m in client_models]
        predicted = {"average": average(inputs), "ensemble": sum(x.softmax(1) for x in logits),
                     "fusion_target": head_targets(logits, counts), "fused": fused.eval()(inputs)}
        predicted = {name: out.argmax(1) for name, out in predicted.items()}
        for name, classes in predicted.items():
            hits[name] += (classes == labels).sum().item()
        hits["fused_agrees"] += (predicted["fused"] == predicted["fusion_target"]).sum().item()
        seen += len(labels)
    return {name: count / seen for name, count in hits.items()}, average


def run(task: TrainTask, rounds: int, test_size: int) -> list[dict]:
    federation = data.build_federation(task.federation)
    template = task.build_model(federation.num_classes)
    spec = task.input_spec(federation.data)
    test = data.BatchLoader(federation.data.test_images[:test_size], federation.data.test_labels[:test_size], spec, 500)
    proxy = data.BatchLoader(federation.proxy_images(), None, spec, 256)
    state = models.exchanged_state(template)
    rows = []
    for server_round in range(1, rounds + 1):
        round_task = replace(task, server_round=server_round)
        updates = [local_update(round_task, p, state) for p in range(task.federation.clients)]
        client_models = []
        for update in updates:
            model = copy.deepcopy(template)
            models.load_exchanged_state(model, update.state)
            client_models.append(model)
        counts = torch.tensor([u.class_counts for u in updates], dtype=torch.float64)
        # As the server's fusion round does: every client started from one model, no restarts.
        fused, _ = fuse(client_models, proxy, [[torch.from_numpy(u.attributions[level.name]) for level in
                                                 models.levels(template)] for u in updates],
                        class_weights=counts, restarts=False, seed=task.federation.seed + server_round)
        figures, average = round_figures(client_models, [u.metrics["num-examples"] for u in updates], counts,
                                         fused, test)
        rows.append({"round": server_round, **figures})
        state = models.exchanged_state(average)
    return rows


def main(args) -> int:
    settings = RunSettings(
        strategy="fedavg", model=args.model, projection=default_projection(args.model, True),
        resolution=args.resolution, rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr,
        federation=data.FederationSpec(dataset=args.dataset, partition=args.partition, alpha=args.alpha,
                                       classes_per_client=args.classes_per_client, clients=args.clients,
                                       seed=args.seed))
    settings.validate()  # bad input fails here, before any training
    torch.set_num_threads(max(1, args.threads))
    task = replace(settings.train_task(), attribution="gradxact", share_class_counts=True)  # fusion's inputs
    rows = run(task, args.rounds, args.test_size)
    split = f"Dirichlet {args.alpha}" if args.partition == "dirichlet" else (
        f"#C={args.classes_per_client}" if args.partition == "pathological" else args.partition)
    table = Table(title=f"fusion's target against FedAvg's average, test accuracy: {args.model}, {args.dataset}, "
                        f"{split}, {args.clients} clients, {args.local_epochs} local epoch(s), seed {args.seed}")
    for column in ("round", "average (FedAvg)", "ensemble (mean softmax)", "fusion's target", "target - average",
                   "fused model", "fused agrees with target"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["round"]), f"{row['average']:.4f}", f"{row['ensemble']:.4f}",
                      f"{row['fusion_target']:.4f}", f"{100 * (row['fusion_target'] - row['average']):+.1f}",
                      f"{row['fused']:.4f}", f"{row['fused_agrees']:.1%}")
    print_tables(table, console=make_console())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_target.json").write_text(json.dumps({"args": vars(args), "rounds": rows}, indent=2, default=str))
    return 0
