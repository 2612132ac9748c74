"""Real Flower simulations on the Ray backend, on tiny data."""

import json

import numpy as np
import pytest
import torch

import models
from server.results import read_jsonl
from server.settings import RunSettings
from simulations.simulate import simulate
from strategies import PartitionSampler


def _settings(tmp_path, **overrides):
    values = dict(dataset="mnist-5k", partition="iid", clients=4, proxy_size=100, seed=0, rounds=2, local_epochs=2,
                  lr=0.02, batch_size=32, ray_num_cpus=2, out=str(tmp_path / "run"))
    values.update(overrides)
    settings = RunSettings.from_mapping(values)
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
    assert json.loads((run / "config.json").read_text())["dataset"] == "mnist-5k"

    saved = torch.load(run / "model.pt", weights_only=False)
    model = models.create(saved["model"], saved["num_classes"])
    model.load_state_dict(saved["state_dict"])
    assert saved["settings"]["strategy"] == "fedavg"


def test_fedprox_with_partial_participation_samples_the_seeded_partitions(tmp_path):
    settings = _settings(tmp_path, partition="dirichlet", alpha=0.1, clients=6, seed=3, strategy="fedprox",
                         fraction=0.5, local_epochs=1)
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


def _overlaps(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def test_fusion_simulation_learns_and_shares_two_logical_gpus(tmp_path):
    # Non-IID shards, several local epochs: the regime fusion is for. Ray declares two
    # logical GPUs on this GPU-less machine; each client asks for half of one.
    settings = _settings(tmp_path, strategy="fusion", partition="dirichlet", alpha=0.5, proxy_size=256,
                         local_epochs=3, lr=0.05, client_cpus=0.5, client_gpus=0.5, ray_num_gpus=2)
    summary = simulate(settings, show_progress=False)
    run = tmp_path / "run"

    curve = summary["accuracy_curve"]
    assert curve[0] < curve[1] < curve[2] and curve[2] > 0.7, curve
    metrics = read_jsonl(run / "metrics.jsonl")
    levels = len(models.levels(models.create("simple-cnn", 10)))
    for m in metrics:
        assert m["clients_used"] == 4 and m["fusion_s"] > 0 and m["levels_reverted"] < levels
        # Ray's logical GPUs are the clients'; the server fuses where its own process sees CUDA.
        assert m["server_device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
        assert len(m["fit_loss_after"]) == levels
        assert all(a <= b for a, b in zip(m["fit_loss_after"], m["fit_loss_before"]))
        # The check ran on the clients (the ClientApp's evaluate handler, through Ray).
        assert m["check_examples"] > 0 and 0 <= m["check_accuracy_fusion"] <= 1
    clients = read_jsonl(run / "clients.jsonl")
    assert all(c["attribution_s"] > 0 for c in clients)
    by_gpu: dict[str, list] = {}
    for c in clients:
        by_gpu.setdefault(c["gpu_ids"], []).append((c["train_start"], c["train_end"]))
    assert set(by_gpu) == {"0", "1"}, by_gpu.keys()
    assert all(_overlaps(intervals) <= 2 for intervals in by_gpu.values())
    assert summary["mean_clients_used"] == 4 and summary["mean_attribution_s"] > 0
    assert summary["fit_loss_after_per_level"] == pytest.approx(
        [sum(values) / len(values) for values in zip(*(m["fit_loss_after"] for m in metrics))])
    assert summary["rounds_fusion_selected"] == sum(m["selected"] == "fusion" for m in metrics)


def test_simulation_joins_a_running_ray_cluster(tmp_path):
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    started = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={env_dir}"],
        capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        settings = _settings(tmp_path, ray_address=f"127.0.0.1:{port}", ray_num_cpus=0)
        summary = simulate(settings, show_progress=False)
        assert summary["rounds"] == 2 and summary["accuracy_curve"][-1] > summary["accuracy_curve"][0]
        clients = read_jsonl(tmp_path / "run" / "clients.jsonl")
        assert len(clients) == 8 and all(c["status"] == "ok" for c in clients)
    finally:
        _stop_ray_head(env_dir)
        shutil.rmtree(env_dir, ignore_errors=True)


def _stop_ray_head(temp_dir: str) -> None:
    """Stop the processes of this head only (`ray stop` would stop every Ray on the machine)."""
    import psutil

    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()
