"""Benchmark: what fusion aims at, against what FedAvg reaches, round by round.

A FedAvg federation (the clients' own training code, the same partition as `fedfuse
run`, in one process without Flower or Ray). After every round's client training, the
test accuracy of: FedAvg's weighted average of the clients' models; their output
ensemble (mean softmax, the reports' reference); the class-weighted mean of their
log-probabilities (or centred logits: --head-target), the target fusion fits its head to
(`head_targets`); and the fused
model itself (the server's fusion of the same updates, before its check), before and
after its end-to-end refinement, with the share of test images on which its prediction
is the target's. Fusion reproduces that target only in part, so it can only beat
averaging in rounds where the target beats the average."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch
from rich.table import Table

import data
import models
from clients.task import TrainTask
from server.settings import RunSettings
from simulations.inprocess import fedavg_rounds
from simulations.tables import make_console, print_tables
from strategies.fusion import HEAD_TARGETS, fuse, head_targets
from strategies.fusion.engine import refine

HELP = "per FedAvg round: the average against the class-weighted ensemble fusion fits"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--classes-per-client", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proxy-size", type=int, default=1000,
                        help="unlabeled server images held out of the clients' shards, the fusion's proxy data")
    parser.add_argument("--refine-steps", type=int, default=2000,
                        help="at most this many steps of the fused model's end-to-end refinement (0: none)")
    parser.add_argument("--head-target", choices=HEAD_TARGETS, default="log-probs",
                        help="what the fused head fits (fedfuse run's --fusion-head-target)")
    parser.add_argument("--out", default="runs/bench-fusion-target")


@torch.no_grad()
def round_figures(client_models: list, average, counts: torch.Tensor, fused, refined, test,
                  head_target: str = "log-probs") -> dict:
    """Test accuracy of the clients' `average`, their output ensemble, fusion's head
    target (class `counts`: models x classes), the fused model before and after its
    refinement, and how often the refined model predicts what the target does."""
    hits = {"average": 0, "ensemble": 0, "fusion_target": 0, "fitted": 0, "fused": 0, "fused_agrees": 0}
    seen = 0
    for inputs, labels in test:
        logits = [m.eval()(inputs) for m in client_models]
        predicted = {"average": average.eval()(inputs), "ensemble": sum(x.softmax(1) for x in logits),
                     "fusion_target": head_targets(logits, counts, head_target), "fitted": fused.eval()(inputs),
                     "fused": refined.eval()(inputs)}
        predicted = {name: out.argmax(1) for name, out in predicted.items()}
        for name, classes in predicted.items():
            hits[name] += (classes == labels).sum().item()
        hits["fused_agrees"] += (predicted["fused"] == predicted["fusion_target"]).sum().item()
        seen += len(labels)
    return {name: count / seen for name, count in hits.items()}


def run(task: TrainTask, rounds: int, test_size: int, refine_steps: int, head_target: str = "log-probs") -> list[dict]:
    federation = data.build_federation(task.federation)
    template = task.build_model(federation.num_classes)
    spec = task.input_spec(federation.data)
    test = data.BatchLoader(federation.data.test_images[:test_size], federation.data.test_labels[:test_size], spec, 500)
    proxy = torch.cat(list(data.BatchLoader(federation.proxy_images(), None, spec, 256)))
    rows = []
    for fedavg_round in fedavg_rounds(task, models.exchanged_state(template), rounds):
        updates = fedavg_round.updates
        client_models = [models.with_state(template, u.state).eval() for u in updates]
        counts = torch.tensor([u.class_counts for u in updates], dtype=torch.float64)
        # As the server's fusion round does: every client started from one model, no restarts.
        seed = task.federation.seed + fedavg_round.number
        fused, _ = fuse(client_models, [proxy], [[torch.from_numpy(u.attributions[level.name]) for level in
                                                   models.levels(template)] for u in updates],
                        class_weights=counts, restarts=False, head_target=head_target, seed=seed)
        refined = copy.deepcopy(fused)  # as fuse(..., refine_steps) does, kept apart to score both
        if refine_steps:
            refine(refined, proxy, lambda inputs: head_targets([m(inputs) for m in client_models], counts, head_target),
                   refine_steps, seed)
        average = models.with_state(template, fedavg_round.state)
        rows.append({"round": fedavg_round.number,
                     **round_figures(client_models, average, counts, fused, refined, test, head_target)})
    return rows


def main(args) -> int:
    settings = RunSettings.from_mapping({  # projection follows the model, as in `fedfuse run`
        "strategy": "fedavg", "model": args.model, "resolution": args.resolution, "rounds": args.rounds,
        "local_epochs": args.local_epochs, "lr": args.lr, "dataset": args.dataset, "partition": args.partition,
        "alpha": args.alpha, "classes_per_client": args.classes_per_client, "clients": args.clients,
        "seed": args.seed, "proxy_size": args.proxy_size})
    settings.validate()  # bad input fails here, before any training
    torch.set_num_threads(max(1, args.threads))
    task = replace(settings.train_task(), attribution="gradxact", share_class_counts=True)  # fusion's inputs
    rows = run(task, args.rounds, args.test_size, args.refine_steps, args.head_target)
    split = f"Dirichlet {args.alpha}" if args.partition == "dirichlet" else (
        f"#C={args.classes_per_client}" if args.partition == "pathological" else args.partition)
    table = Table(title=f"fusion's target against FedAvg's average, test accuracy: {args.model}, {args.dataset}, "
                        f"{split}, {args.clients} clients, {args.local_epochs} local epoch(s), seed {args.seed}")
    for column in ("round", "average (FedAvg)", "ensemble (mean softmax)", "fusion's target", "target - average",
                   "fused, fitted", "fused, refined", "refined agrees with target"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["round"]), f"{row['average']:.4f}", f"{row['ensemble']:.4f}",
                      f"{row['fusion_target']:.4f}", f"{100 * (row['fusion_target'] - row['average']):+.1f}",
                      f"{row['fitted']:.4f}", f"{row['fused']:.4f}", f"{row['fused_agrees']:.1%}")
    print_tables(table, console=make_console())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fusion_target.json").write_text(json.dumps({"args": vars(args), "rounds": rows}, indent=2, default=str))
    return 0
