"""The ServerApp: run settings -> strategy, central evaluation, run directory."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
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
from server.results import RunDirectory, read_clients, summarise
from server.settings import RESUMABLE_CHANGES, RunSettings, SettingsError
from strategies.messages import array_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for `flwr run .`: settings come from [tool.flwr.app.config]."""
    settings = settings_from_run_config(context.run_config)
    run_federation(grid, settings, RunProgress(settings.total_rounds, enabled=False))


def settings_from_run_config(run_config) -> RunSettings:
    """`flwr run .`'s door: [tool.flwr.app.config] and its --run-config overrides, checked
    in full as `fedfuse run` checks its flags."""
    settings = RunSettings.from_mapping(run_config)
    settings.validate()
    return settings


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
    return {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES}


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


def _open_run_directory(settings: RunSettings, federation) -> tuple[RunDirectory, dict | None]:
    """A fresh run directory, or with --resume the last complete round's checkpoint
    (records of a round cut off by the kill dropped, random states restored)."""
    out = RunDirectory(settings.out)
    checkpoint = _resume_point(out, settings) if settings.resume else None
    if checkpoint is None:
        histogram = federation.histogram()
        out.start(settings.to_dict(), {
            "classes": list(federation.data.classes), "histogram": histogram,
            "proxy_size": len(federation.proxy_indices), "label_skew": label_skew(histogram),
        })
    else:
        out.keep_rounds(checkpoint["round"])
        _restore_rng(checkpoint["rng"])
        log(INFO, "fedfuse: resuming %s after round %d", settings.out, checkpoint["round"])
    return out, checkpoint


@dataclass(frozen=True)
class Phase:
    """Rounds `first + 1 .. last` of the run, projected or (after folding) fully fine-tuned;
    `restore`: load the checkpoint's model into it (the kill came inside it or at its end)."""

    full_finetune: bool
    first: int
    last: int
    restore: bool


def plan_phases(rounds: int, full_finetune_rounds: int, resume_round: int) -> list[Phase]:
    """The phases still to run after `resume_round` complete rounds (0: a fresh run),
    and the finished phases that only need the checkpoint's model."""
    phases, done = [], 0
    for count, full_finetune in ((rounds, False), (full_finetune_rounds, True)):
        if count == 0:
            continue
        first = min(max(done, resume_round), done + count)
        phases.append(Phase(full_finetune, first, done + count, restore=done < resume_round <= done + count))
        done += count
    return phases


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


class RoundRecorder:
    """Flower's central evaluation hook: tests each round's global model, then writes the
    round's metrics and client lines and the checkpoint."""

    def __init__(self, settings: RunSettings, out: RunDirectory, federation, test_loader, progress: RunProgress,
                 history: list[dict]):
        self.settings, self.out, self.test_loader, self.progress = settings, out, test_loader, progress
        self.histogram = federation.histogram()
        self.history = history
        self.model = None  # the phase's model, set before each phase

    def evaluate(self, strategy, full_finetune: bool, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        models.load_exchanged_state(self.model, {k: v.numpy() for k, v in arrays.items()})
        result = evaluate(self.model, self.test_loader)
        if server_round == 0:  # the phase's starting model
            if not self.history:
                self.history.append({"round": 0, "accuracy": result["accuracy"], "loss": result["loss"]})
        else:
            self._write_round(strategy, result, full_finetune, arrays)
        return MetricRecord({"accuracy": result["accuracy"], "loss": result["loss"]})

    def _write_round(self, strategy, result: dict, full_finetune: bool, arrays: ArrayRecord) -> None:
        record = strategy.current
        row = {
            "round": record.server_round, "accuracy": result["accuracy"], "loss": result["loss"],
            "bytes_up": record.bytes_up, "bytes_down": record.bytes_down, "aggregate_s": record.aggregate_s,
            "round_s": time.perf_counter() - record.started, "clients_ok": record.clients_ok,
            "clients_failed": record.clients_failed, "clients_rejected": record.clients_rejected,
            "projected": not full_finetune and self.settings.task.projection, "rss_mb": _memory_mb(), **record.extra,
        }
        self.history.append(row)
        self.out.append_round(row, [
            {**line, "class_counts": self.histogram[line["partition"]]} if line["partition"] >= 0 else line
            for line in record.clients
        ])
        # After the round's records: a kill before this line redoes the round on resume.
        self.out.save_checkpoint({
            "round": record.server_round, "full_finetune": full_finetune, "settings": _resumable(self.settings),
            "arrays": {k: v.numpy() for k, v in arrays.items()}, "history": self.history, "rng": _rng_state(),
            "server_state": strategy.server_state(),
        })
        self.progress.round_done(row)


def _ensemble_accuracy(template, updates: list[ArrayRecord], test_loader) -> float | None:
    """Test accuracy of the output ensemble of the last round's valid client models."""
    return ensemble_accuracy([models.with_state(template, arrays) for arrays in updates], test_loader) \
        if updates else None


def run_federation(grid: Grid, settings: RunSettings, progress: RunProgress) -> dict:
    """Run all rounds and write the run directory; returns the summary.

    With --full-finetune-rounds K, the projected global model is folded after the
    projected rounds and K more rounds train every weight, with the same strategy."""
    started = time.perf_counter()
    # Server-side merges (fusion, FedDF) sum in an order that depends on torch's thread
    # count: use this machine's default, whatever the process set before, so that a run
    # resumed in another process follows the same curve.
    torch.set_num_threads(os.cpu_count() or 1)
    spec = settings.federation
    federation = build_federation(spec)
    node_to_partition = map_nodes_to_partitions(grid, spec.clients)
    out, checkpoint = _open_run_directory(settings, federation)
    task = settings.train_task()
    model = task.build_model(federation.num_classes)
    test_loader = BatchLoader(federation.data.test_images, federation.data.test_labels,
                              task.input_spec(federation.data), batch_size=250)
    # The server's unlabeled proxy set, as model inputs (fusion and FedDF merge on it).
    proxy = torch.cat(list(BatchLoader(federation.proxy_images(), None, task.input_spec(federation.data), 256))) \
        if settings.strategy in strategies.PROXY_STRATEGIES else None
    sampler = strategies.PartitionSampler(node_to_partition, settings.fraction, settings.min_clients, spec.seed)
    recorder = RoundRecorder(settings, out, federation, test_loader, progress,
                             list(checkpoint["history"]) if checkpoint else [])
    log(INFO, "fedfuse: %s on %s (%s), %d clients, %d rounds",
        settings.strategy, spec.dataset, spec.partition, spec.clients, settings.total_rounds)

    strategy = None
    for phase in plan_phases(settings.rounds, settings.full_finetune_rounds, checkpoint["round"] if checkpoint else 0):
        if phase.full_finetune:
            model, task = models.fold(model), settings.train_task(full_finetune=True)
        if phase.restore:
            models.load_exchanged_state(model, checkpoint["arrays"])
        if phase.first == phase.last:  # the whole phase finished before the kill
            continue
        strategy = strategies.build(
            settings.strategy, template=model, proxy=proxy, attribution=task.attribution, seed=spec.seed,
            num_classes=federation.num_classes if task.share_class_counts else None, **settings.strategy_options(),
        )
        strategy.sampler, strategy.round_offset = sampler, phase.first
        if phase.restore:  # a server optimiser's moments, where the kill left them
            strategy.load_server_state(checkpoint.get("server_state", {}))
        recorder.model = model
        result = strategy.start(
            grid=ProgressGrid(grid, progress), initial_arrays=array_record(models.exchanged_state(model)),
            num_rounds=phase.last - phase.first, train_config=ConfigRecord(task.to_config()),
            evaluate_fn=partial(recorder.evaluate, strategy, phase.full_finetune),
        )
        models.load_exchanged_state(model, {k: v.numpy() for k, v in result.arrays.items()})

    summary = summarise(
        settings, settings.strategy, recorder.history, read_clients(out.path),
        label_skew=label_skew(recorder.histogram),
        ensemble_accuracy=_ensemble_accuracy(model, strategy.last_updates if strategy else [], test_loader),
        wall_s=time.perf_counter() - started,
    )
    # The saved model is plain (folded): it loads into models.create(name, classes).
    out.finish(summary, {
        "model": task.model, "num_classes": federation.num_classes,
        "state_dict": models.fold(model).state_dict(), "settings": settings.to_dict(),
    })
    return summary
