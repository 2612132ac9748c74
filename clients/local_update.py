"""One client's round of work, without Flower: load the global state, train on the
shard, return the new state and metrics. The ClientApp and the plain-loop benchmark
both call this."""

from __future__ import annotations

import copy
import zlib
from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch

import models
from clients import runtime, training
from clients.task import TrainTask
from data import BatchLoader, build_federation


@lru_cache(maxsize=2)
def _initial_model(task: TrainTask, num_classes: int) -> torch.nn.Module:
    # Built (and for backbones, weights loaded) once per worker process and phase.
    return task.build_model(num_classes)


def local_update(task: TrainTask, partition_id: int, global_state: dict[str, np.ndarray]) -> tuple[dict, dict]:
    device = runtime.pick_device()
    federation = build_federation(task.federation)
    if not 0 <= partition_id < len(federation.client_indices):
        raise ValueError(f"partition {partition_id} does not exist: the federation has {task.federation.clients} clients")
    model = copy.deepcopy(_initial_model(replace(task, server_round=0), federation.num_classes))
    models.load_exchanged_state(model, global_state)
    images, labels = federation.client_data(partition_id)
    # A distinct, reproducible shuffle per (seed, round, client).
    seed = zlib.crc32(f"{task.federation.seed}/{task.server_round}/{partition_id}".encode())
    torch.manual_seed(seed)
    loader = BatchLoader(images, labels, task.input_spec(federation.data), task.batch_size,
                         shuffle=True, seed=seed, device=device)
    stats = training.train(model, loader, task.local_epochs, task.lr, task.momentum,
                           task.weight_decay, task.proximal_mu, device)
    state = models.exchanged_state(model)
    metrics = {
        "num-examples": len(labels),
        "partition-id": partition_id,
        "loss": float(stats["loss"]),
        "train-s": float(stats["train_s"]),
        "steps": int(stats["steps"]),
    }
    return state, metrics
