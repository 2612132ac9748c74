"""The ServerApp: run settings -> strategy, central evaluation, run directory."""

from __future__ import annotations

import copy
import random
import time
from functools import partial
from logging import INFO

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

import models
import strategies
from clients.training import ensemble_accuracy, evaluate
from data import BatchLoader, build_federation, label_skew
from server.progress import ProgressGrid, RunProgress
from server.results import RunDirectory, read_jsonl
from server.settings import RunSettings, SettingsError
from strategies.messages import array_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: settings come from [tool.flwr.app.config]."""
    settings = RunSettings.from_mapping(context.run_config)
    settings.validate()
    run_federation(grid, settings, RunProgress(settings.total_rounds, enabled=False))


def map_nodes_to_partitions(grid: Grid, expected_clients: int, timeout: float = 600.0) -> dict[int, int]:
    """Ask every node which partition it holds (a 'query' message); wait for nodes that
    connect late (deployment), but fail at once if the federation has another size."""
    deadline = time.time() + timeout
    mapping: dict[int, int] = {}
    while len(mapping) < expected_clients:
        new_nodes = [n for n in grid.get_node_ids() if n not in mapping]
        messages = [
            Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in new_nodes
        ]
        for reply in grid.send_and_receive(messages, timeout=timeout) if messages else []:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the handshake: {reply.error.reason}")
            metrics = reply.content["metrics"]
            if metrics["num-partitions"] not in (0, expected_clients):
                raise SettingsError(
                    f"the federation has {metrics['num-partitions']} simulated nodes but clients is "
                    f"{expected_clients}: set num-supernodes to {expected_clients} (see README)"
                )
            mapping[reply.metadata.src_node_id] = int(metrics["partition-id"])
        if len(mapping) < expected_clients:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(mapping)} of {expected_clients} nodes connected in {timeout:.0f}s")
            time.sleep(1.0)
    partitions = sorted(mapping.values())
    if partitions != list(range(expected_clients)):
        raise SettingsError(f"nodes hold partitions {partitions[:5]}...; expected 0..{expected_clients - 1}")
    return mapping


def _resumable(settings: RunSettings) -> dict:
    """The settings a resumed run must share with the interrupted one."""
    values = settings.to_dict()
    for key in ("out", "resume", "ray_address", "ray_num_cpus", "ray_num_gpus", "client_cpus", "client_gpus"):
        values.pop(key, None)
    return values


def _resume_point(out: RunDirectory, settings: RunSettings) -> dict | None:
    """The last complete round's checkpoint, or None (a fresh start) when there is none."""
    checkpoint = out.load_checkpoint()
    if checkpoint is None:
        log(INFO, "fedfuse: --resume found no checkpoint in %s: starting from round 1", settings.out)
        return None
    saved, now = checkpoint.get("settings", {}), _resumable(settings)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise SettingsError(f"--resume: {settings.out} holds a run with other settings ({', '.join(changed)}): "
                            "use the same flags, or another --out")
    return checkpoint


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _ensemble_accuracy(template, updates: list[ArrayRecord], test_loader) -> float | None:
    """Test accuracy of the output ensemble of the last round's valid client models."""
    if not updates:
        return None
    client_models = []
    for arrays in updates:
        client_model = copy.deepcopy(template)
        models.load_exchanged_state(client_model, {k: v.numpy() for k, v in arrays.items()})
        client_models.append(client_model)
    return ensemble_accuracy(client_models, test_loader)


def _memory_mb() -> float:
    """Resident memory of this process and its children (a local Ray's workers) in MB."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total / 1e6


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _per_level_mean(per_round: list[list[float]]) -> list[float] | None:
    """Mean over rounds, level by level, of the rounds with the last round's levels (a
    full fine-tuning phase after projection may change them)."""
    if not per_round:
        return None
    same = [r for r in per_round if len(r) == len(per_round[-1])]
    return np.mean(np.array(same, dtype=float), 0).tolist()


def run_federation(grid: Grid, settings: RunSettings, progress: RunProgress) -> dict:
    """Run all rounds and write the run directory; returns the summary.

    With --full-finetune-rounds K, the projected global model is folded after the
    projected rounds and K more rounds train every weight, with the same strategy."""
    started = time.perf_counter()
    spec = settings.federation
    federation = build_federation(spec)
    histogram = federation.histogram()
    node_to_partition = map_nodes_to_partitions(grid, spec.clients)
    out = RunDirectory(settings.out)
    checkpoint = _resume_point(out, settings) if settings.resume else None
    if checkpoint is None:
        out.start(settings.to_dict(), {
            "classes": list(federation.data.classes),
            "histogram": histogram,
            "proxy_size": len(federation.proxy_indices),
            "label_skew": label_skew(histogram),
        })
    else:
        out.keep_rounds(checkpoint["round"])
        _restore_rng(checkpoint["rng"])
        log(INFO, "fedfuse: resuming %s after round %d", settings.out, checkpoint["round"])

    task = settings.train_task()
    model = task.build_model(federation.num_classes)
    test_loader = BatchLoader(federation.data.test_images, federation.data.test_labels,
                              task.input_spec(federation.data), batch_size=250)
    # The server's unlabeled proxy set, as model inputs (fusion fits the fused model on it).
    proxy = torch.cat(list(BatchLoader(federation.proxy_images(), None, task.input_spec(federation.data), 256))) \
        if settings.strategy == "fusion" else None
    sampler = strategies.PartitionSampler(node_to_partition, settings.fraction, settings.min_clients, spec.seed)
    history: list[dict] = list(checkpoint["history"]) if checkpoint else []
    log(INFO, "fedfuse: %s on %s (%s), %d clients, %d rounds",
        settings.strategy, spec.dataset, spec.partition, spec.clients, settings.total_rounds)

    def central_evaluation(strategy, full_finetune: bool, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        models.load_exchanged_state(model, {k: v.numpy() for k, v in arrays.items()})
        result = evaluate(model, test_loader)
        metrics = MetricRecord({"accuracy": result["accuracy"], "loss": result["loss"]})
        if server_round == 0:  # the phase's starting model
            if not history:
                history.append({"round": 0, "accuracy": result["accuracy"], "loss": result["loss"]})
            return metrics
        record = strategy.current
        row = {
            "round": record.server_round,
            "accuracy": result["accuracy"],
            "loss": result["loss"],
            "bytes_up": record.bytes_up,
            "bytes_down": record.bytes_down,
            "aggregate_s": record.aggregate_s,
            "round_s": time.perf_counter() - record.started,
            "clients_ok": record.clients_ok,
            "clients_failed": record.clients_failed,
            "clients_rejected": record.clients_rejected,
            "projected": task.projection,
            "rss_mb": _memory_mb(),
            **record.extra,
        }
        history.append(row)
        out.append("metrics.jsonl", [row])
        out.append("clients.jsonl", [
            {**line, "class_counts": histogram[line["partition"]]} if line["partition"] >= 0 else line
            for line in record.clients
        ])
        # After the round's records: a kill before this line redoes the round on resume.
        out.save_checkpoint({
            "round": record.server_round, "full_finetune": full_finetune, "settings": _resumable(settings),
            "arrays": {k: v.numpy() for k, v in arrays.items()}, "history": history, "rng": _rng_state(),
        })
        progress.round_done(row)
        return metrics

    phases = [(settings.rounds, False)] + ([(settings.full_finetune_rounds, True)] if settings.full_finetune_rounds else [])
    done, strategy = 0, None
    resume_round = checkpoint["round"] if checkpoint else 0
    for num_rounds, full_finetune in phases:
        if full_finetune:
            model = models.fold(model)
            task = settings.train_task(full_finetune=True)
        if resume_round >= done + num_rounds:  # the whole phase finished before the kill
            done += num_rounds
            if resume_round == done:
                models.load_exchanged_state(model, checkpoint["arrays"])
            continue
        if resume_round > done:  # resume inside this phase, from the checkpoint's model
            models.load_exchanged_state(model, checkpoint["arrays"])
        strategy = strategies.build(
            settings.strategy, proximal_mu=settings.proximal_mu, template=model, proxy=proxy,
            attribution=settings.attribution, seed=spec.seed, fusion_check=settings.fusion_check,
            check_samples=settings.check_samples, fusion_rounds=settings.fusion_rounds,
            num_classes=federation.num_classes if settings.share_class_counts else None,
        )
        first = max(done, resume_round)  # rounds of this phase already run
        strategy.sampler, strategy.round_offset = sampler, first
        result = strategy.start(
            grid=ProgressGrid(grid, progress),
            initial_arrays=array_record(models.exchanged_state(model)),
            num_rounds=done + num_rounds - first,
            train_config=ConfigRecord(task.to_config()),
            evaluate_fn=partial(central_evaluation, strategy, full_finetune),
        )
        models.load_exchanged_state(model, {k: v.numpy() for k, v in result.arrays.items()})
        done += num_rounds
    ensemble = _ensemble_accuracy(model, strategy.last_updates if strategy else [], test_loader)

    rounds = [r for r in history if r["round"] > 0]
    client_lines = read_jsonl(out.path / "clients.jsonl") if (out.path / "clients.jsonl").exists() else []
    attribution_seconds = [c["attribution_s"] for c in client_lines if "attribution_s" in c]
    fused_rounds = [r for r in rounds if "fit_loss_after" in r]
    summary = {
        "strategy": settings.strategy,
        "dataset": spec.dataset,
        "partition": spec.partition,
        "alpha": spec.alpha,
        "classes_per_client": spec.classes_per_client,
        "clients": spec.clients,
        "model": settings.model,
        "projection": settings.projection,
        "pointwise": settings.pointwise if settings.projection else "",
        "full_finetune_rounds": settings.full_finetune_rounds,
        "seed": spec.seed,
        "rounds": len(rounds),
        "initial_accuracy": history[0]["accuracy"],
        "final_accuracy": rounds[-1]["accuracy"] if rounds else history[0]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "accuracy_curve": [r["accuracy"] for r in history],
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "mean_round_s": float(np.mean([r["round_s"] for r in rounds])) if rounds else 0.0,
        "mean_aggregate_s": float(np.mean([r["aggregate_s"] for r in rounds])) if rounds else 0.0,
        "mean_fusion_s": _mean([r["fusion_s"] for r in rounds if "fusion_s" in r]),
        "mean_clients_used": _mean([r.get("clients_used", r["clients_ok"]) for r in rounds]),
        "mean_attribution_s": _mean(attribution_seconds),
        # Fusion's figures: per level, the mean over rounds of its fit loss before and after
        # the fit; the share of channels the matching moved; rounds that sent the fused model.
        "fit_loss_before_per_level": _per_level_mean([r["fit_loss_before"] for r in fused_rounds]),
        "fit_loss_after_per_level": _per_level_mean([r["fit_loss_after"] for r in fused_rounds]),
        "mean_assignment_moved": _mean([r["assignment_moved"] for r in fused_rounds
                                        if not np.isnan(r["assignment_moved"])]),
        "rounds_fusion_selected": sum(r.get("selected") == "fusion" for r in fused_rounds) if fused_rounds else None,
        "label_skew": label_skew(histogram),
        "ensemble_accuracy": ensemble,
        "wall_s": time.perf_counter() - started,
    }
    # The saved model is plain (folded): it loads into models.create(name, classes).
    out.finish(summary, {
        "model": settings.model, "num_classes": federation.num_classes,
        "state_dict": models.fold(model).state_dict(), "settings": settings.to_dict(),
    })
    return summary
