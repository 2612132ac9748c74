"""One client's round of work, without Flower: load the global state, train on the
shard, return the new state and metrics. The ClientApp and the plain-loop benchmark
both call this."""

from __future__ import annotations

import copy
import time
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

import models
from clients import attacks, runtime, training
from clients.task import TrainTask
from data import BatchLoader, build_federation
from strategies.fusion.attribution import neuron_attributions


@lru_cache(maxsize=2)
def _initial_model(task: TrainTask, num_classes: int) -> torch.nn.Module:
    # Built (and for backbones, weights loaded) once per worker process and phase.
    return task.build_model(num_classes)


def _model_from(task: TrainTask, num_classes: int, state: dict[str, np.ndarray]) -> torch.nn.Module:
    model = copy.deepcopy(_initial_model(replace(task, server_round=0), num_classes))
    models.load_exchanged_state(model, state)
    return model


def _client_federation(task: TrainTask, partition_id: int):
    federation = build_federation(task.federation)
    if not 0 <= partition_id < len(federation.client_indices):
        raise ValueError(f"partition {partition_id} does not exist: the federation has {task.federation.clients} clients")
    return federation


@dataclass
class ClientUpdate:
    state: dict[str, np.ndarray]  # the exchanged tensors after local training
    metrics: dict
    attributions: dict[str, np.ndarray] | None = None  # level name -> one score per neuron
    class_counts: list[int] | None = None


def local_update(task: TrainTask, partition_id: int, global_state: dict[str, np.ndarray]) -> ClientUpdate:
    """Train on the shard; for fusion, also score every level's neurons on it (the labels
    never leave the client: only one number per neuron does)."""
    device = runtime.pick_device()
    federation = _client_federation(task, partition_id)
    model = _model_from(task, federation.num_classes, global_state)
    images, labels = federation.client_data(partition_id)
    labels = attacks.training_labels(task, partition_id, labels, federation.num_classes)
    # A distinct, reproducible shuffle per (seed, round, client).
    seed = zlib.crc32(f"{task.federation.seed}/{task.server_round}/{partition_id}".encode())
    torch.manual_seed(seed)
    loader = BatchLoader(images, labels, task.input_spec(federation.data), task.batch_size,
                         shuffle=True, seed=seed, device=device)
    wall_start = time.time()
    stats = training.train(model, loader, task.local_epochs, task.lr, task.momentum,
                           task.weight_decay, task.proximal_mu, device, task.norm_stats, steps=task.local_steps)
    state = models.exchanged_state(model)
    metrics = {
        "num-examples": len(labels),
        "partition-id": partition_id,
        "loss": float(stats["loss"]),
        "train-s": float(stats["train_s"]),
        "steps": int(stats["steps"]),
        "train-start": wall_start,  # wall clock: which clients overlapped on a GPU
        "train-end": time.time(),
    }
    update = ClientUpdate(state, metrics)
    if task.attribution and task.attribution != "uniform":
        started = time.perf_counter()
        sample = BatchLoader(images, labels, task.input_spec(federation.data), task.batch_size,
                             shuffle=True, seed=seed + 1, device=device)
        scores = neuron_attributions(model, sample, task.attribution, max_samples=task.attribution_samples)
        update.attributions = {level.name: s.detach().cpu().numpy().astype(np.float32)
                               for level, s in zip(models.levels(model), scores)}
        metrics["attribution-s"] = time.perf_counter() - started
    if task.share_class_counts:
        update.class_counts = np.bincount(labels, minlength=federation.num_classes).astype(int).tolist()
    return update


def check_candidates(task: TrainTask, partition_id: int, candidates: dict[str, dict[str, np.ndarray]],
                     samples: int, temperatures: list[float] = (1.0,)) -> dict:
    """Fusion's model check on this client: the accuracy of each candidate global model
    on a seeded sample of at most `samples` of the shard's examples, its mean
    cross-entropy with the logits divided by each of `temperatures` (a list per
    candidate), and the shard's size. Only these numbers leave the client."""
    device = runtime.pick_device()
    federation = _client_federation(task, partition_id)
    images, labels = federation.client_data(partition_id)
    seed = zlib.crc32(f"{task.federation.seed}/{task.server_round}/{partition_id}/check".encode())
    chosen = np.sort(np.random.default_rng(seed).permutation(len(labels))[:samples])
    loader = BatchLoader(images[chosen], labels[chosen], task.input_spec(federation.data), 250, device=device)
    # The server weighs each client's figures by its shard: the sample stands for all of it.
    metrics = {"num-examples": len(labels), "checked-examples": len(chosen), "partition-id": partition_id}
    for name, state in candidates.items():
        logits, targets = training.predict(_model_from(task, federation.num_classes, state), loader, device)
        metrics[f"{name}-accuracy"] = float((logits.argmax(1) == targets).double().mean())
        metrics[f"{name}-losses"] = [float(torch.nn.functional.cross_entropy(logits / t, targets)) for t in temperatures]
    return metrics
