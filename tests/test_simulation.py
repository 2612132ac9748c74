"""Real Flower simulations on the Ray backend, on tiny data."""

import json

import numpy as np
import torch

import models
from data import FederationSpec
from server.results import read_jsonl
from server.settings import RunSettings
from simulations.simulate import simulate
from strategies import PartitionSampler


def _settings(tmp_path, **overrides):
    federation = FederationSpec(dataset="mnist-5k", partition="iid", clients=4, proxy_size=100, seed=0)
    values = dict(federation=federation, rounds=2, local_epochs=2, lr=0.02, batch_size=32,
                  ray_num_cpus=2, out=str(tmp_path / "run"))
    values.update(overrides)
    settings = RunSettings(**values)
    settings.validate()
    return settings


def test_two_round_fedavg_simulation_learns_and_writes_the_run_directory(tmp_path):
    settings = _settings(tmp_path)
    summary = simulate(settings, show_progress=False)
    run = tmp_path / "run"

    curve = summary["accuracy_curve"]
    assert len(curve) == 3 and curve[0] < curve[1] < curve[2] and curve[2] > 0.7, curve

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    assert [m["accuracy"] for m in metrics] == curve[1:]
    assert all(m["clients_ok"] == 4 and m["clients_failed"] == 0 and m["clients_rejected"] == 0 for m in metrics)
    payload = models.state_bytes(models.exchanged_state(models.create("simple-cnn", 10)))

    clients = read_jsonl(run / "clients.jsonl")
    assert [(c["round"], c["partition"]) for c in clients] == [(r, p) for r in (1, 2) for p in range(4)]
    assert sum(c["num_examples"] for c in clients if c["round"] == 1) == 4000 - 100
    assert all(c["num_examples"] == sum(c["class_counts"]) for c in clients)
    assert all(c["device"] == "cpu" and c["train_s"] > 0 for c in clients)
    # Bytes on the wire: the tensors plus a little record metadata, the same both ways.
    assert all(payload <= c["bytes_up"] < 1.02 * payload for c in clients)
    for m in metrics:
        assert m["bytes_up"] == m["bytes_down"] == sum(c["bytes_up"] for c in clients if c["round"] == m["round"])

    partition = json.loads((run / "partition.json").read_text())
    assert np.array(partition["histogram"]).sum() == 3900 and partition["proxy_size"] == 100
    assert json.loads((run / "config.json").read_text())["federation"]["dataset"] == "mnist-5k"

    saved = torch.load(run / "model.pt", weights_only=False)
    model = models.create(saved["model"], saved["num_classes"])
    model.load_state_dict(saved["state_dict"])
    assert saved["settings"]["strategy"] == "fedavg"


def test_fedprox_with_partial_participation_samples_the_seeded_partitions(tmp_path):
    federation = FederationSpec(dataset="mnist-5k", partition="dirichlet", alpha=0.1, clients=6,
                                proxy_size=100, seed=3)
    settings = _settings(tmp_path, federation=federation, strategy="fedprox", fraction=0.5, local_epochs=1)
    summary = simulate(settings, show_progress=False)
    clients = read_jsonl(tmp_path / "run" / "clients.jsonl")
    sampler = PartitionSampler({p: p for p in range(6)}, fraction=0.5, min_clients=1, seed=3)
    for r in (1, 2):
        assert [c["partition"] for c in clients if c["round"] == r] == sampler.sample_partitions(r)
    # alpha 0.1: clients see few classes, and the run records how skewed the split is.
    assert summary["label_skew"] > 0.5
    top_two_share = [sum(sorted(c["class_counts"])[-2:]) / sum(c["class_counts"]) for c in clients]
    assert np.mean(top_two_share) > 0.6  # an IID client's two largest classes hold about 0.2
    assert summary["final_accuracy"] > summary["initial_accuracy"]


def test_projected_rounds_send_fewer_bytes_then_fold_into_full_finetuning(tmp_path):
    settings = _settings(tmp_path, projection=True, pointwise="freeze", rounds=1, full_finetune_rounds=1)
    summary = simulate(settings, show_progress=False)
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(m["round"], m["projected"]) for m in metrics] == [(1, True), (2, False)]
    projected_bytes = models.state_bytes(models.exchanged_state(settings.train_task().build_model(10)))
    full_bytes = models.state_bytes(models.exchanged_state(models.create("simple-cnn", 10)))
    assert projected_bytes < 0.05 * full_bytes
    assert projected_bytes * 4 <= metrics[0]["bytes_up"] < 0.05 * metrics[1]["bytes_up"]
    assert full_bytes * 4 <= metrics[1]["bytes_up"] < 1.02 * full_bytes * 4
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    clients = read_jsonl(tmp_path / "run" / "clients.jsonl")
    assert [c["round"] for c in clients] == [1] * 4 + [2] * 4  # round numbers continue across phases
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    models.create("simple-cnn", 10).load_state_dict(saved["state_dict"])  # saved folded, as a plain model
