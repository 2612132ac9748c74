"""Centralised training on the union of the clients' shards with the federation's
budget (rounds x local epochs passes, same model, optimiser and batch size): the
reference a federated result is measured against. Writes a run directory like a
federation's, so reports read it the same way (strategy "centralised", no bytes)."""

from __future__ import annotations

import time

import numpy as np
import torch

from clients import runtime, training
from data import BatchLoader, build_federation
from server.results import RunDirectory, summarise
from server.settings import RunSettings

CENTRALISED = "centralised"  # the strategy name its records carry


def run_centralised(settings: RunSettings) -> dict:
    started = time.perf_counter()
    runtime.configure_threads(torch.get_num_threads())
    spec = settings.federation
    federation = build_federation(spec)
    task = settings.train_task()
    torch.manual_seed(spec.seed)
    model = task.build_model(federation.num_classes)
    union = np.concatenate(federation.client_indices)
    input_spec = task.input_spec(federation.data)
    loader = BatchLoader(federation.data.train_images[union], federation.data.train_labels[union], input_spec,
                         task.batch_size, shuffle=True, seed=spec.seed)
    test = BatchLoader(federation.data.test_images, federation.data.test_labels, input_spec, batch_size=250)
    out = RunDirectory(settings.out)
    out.start({**settings.to_dict(), "strategy": CENTRALISED}, {"proxy_size": len(federation.proxy_indices)})
    result = training.evaluate(model, test)
    history = [{"round": 0, "accuracy": result["accuracy"], "loss": result["loss"]}]
    # A "round" = local_epochs passes over the union, or with local_steps the steps of all clients together.
    for server_round in range(1, settings.rounds + 1):
        round_started = time.perf_counter()
        training.train(model, loader, task.local_epochs, task.lr, task.momentum, task.weight_decay,
                       norm_stats=task.norm_stats, steps=task.local_steps * spec.clients)
        result = training.evaluate(model, test)
        row = {"round": server_round, "accuracy": result["accuracy"], "loss": result["loss"], "bytes_up": 0,
               "bytes_down": 0, "aggregate_s": 0.0, "round_s": time.perf_counter() - round_started}
        history.append(row)
        out.append_round(row)
    summary = summarise(settings, CENTRALISED, history, [], ensemble_accuracy=None,
                        wall_s=time.perf_counter() - started)
    out.finish(summary, {"model": task.model, "num_classes": federation.num_classes,
                         "state_dict": model.state_dict(), "settings": settings.to_dict()})
    return summary
