"""Faults, bad updates, crash and resume, repeatability: real Ray simulations on tiny data."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from clients import faults
from server.results import read_jsonl
from server.settings import RunSettings
from simulations.simulate import simulate
from strategies.validation import reply_problem


def _settings(out, **overrides):
    values = dict(dataset="mnist-5k", partition="dirichlet", alpha=0.5, clients=4, proxy_size=100, seed=3, rounds=3,
                  local_epochs=1, lr=0.05, batch_size=32, ray_num_cpus=2, out=str(out))
    values.update(overrides)
    settings = RunSettings.from_mapping(values)
    settings.validate()
    return settings


def test_poisoned_updates_are_of_a_kind_validation_refuses():
    state = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    expected = {k: (v.shape, v.dtype) for k, v in state.items()}
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    def content(s):
        return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in s.items()}),
                           "metrics": MetricRecord({"num-examples": 5})})

    assert reply_problem(content(state), expected) is None
    for kind, reason in (("nan", "non-finite"), ("inf", "non-finite"), ("shape", "shape")):
        assert reason in reply_problem(content(faults.poison_state(state, kind)), expected)
    assert np.allclose(faults.poison_state(state, "scale")["w"], faults.SCALE_FACTOR)
    assert faults.poisoned_partitions(2, 10, seed=0) == faults.poisoned_partitions(2, 10, seed=0)
    assert len(faults.poisoned_partitions(2, 10, seed=0)) == 2
    draws = []
    for r in range(200):
        try:
            faults.maybe_fail(0.3, 0, r, 1)
            draws.append(0)
        except faults.InjectedFailure:
            draws.append(1)
    assert 0.2 < np.mean(draws) < 0.4


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    return simulate(_settings(out), show_progress=False), out


def test_the_same_command_twice_gives_the_same_curve(clean_run, tmp_path):
    summary, _ = clean_run
    again = simulate(_settings(tmp_path / "again"), show_progress=False)
    assert again["accuracy_curve"] == summary["accuracy_curve"]


def test_faulty_clients_never_reach_the_global_model(clean_run, tmp_path):
    summary, _ = clean_run
    out = tmp_path / "faulty"
    faulty = simulate(_settings(out, client_failure_rate=0.3, poison_clients=1, poison="nan"), show_progress=False)
    lines = read_jsonl(out / "clients.jsonl")
    failed = [c for c in lines if c["status"] == "failed"]
    poisoned = [c for c in lines if c.get("injected") == "poison:nan"]
    assert failed and all("injected failure" in c["reason"] for c in failed)
    assert poisoned and all(c["status"] == "rejected" and "non-finite" in c["reason"] for c in poisoned)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert sum(m["clients_failed"] for m in metrics) == len(failed)
    assert sum(m["clients_rejected"] for m in metrics) == len(poisoned)
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # With 4 clients, a third of them failing and one poisoned, 1-3 updates per round remain:
    # the model still learns (the 10-client figures are in the README).
    assert faulty["final_accuracy"] > faulty["initial_accuracy"] + 0.3


# Strategies with state across rounds (server momentum, Adam's moments) or a server-side
# merge must resume exactly too; FedDF distills for at most 200 steps here.
RIVALS = {"fedavgm": {"server_momentum": 0.9}, "fedadam": {}, "fedyogi": {}, "feddf": {"distill_steps": 200}}


def _rivals(*fast: str) -> list:
    """Every rival; those not in `fast` run with `make test-slow` (the default suite stays
    under 15 minutes)."""
    return [name if name in fast else pytest.param(name, marks=pytest.mark.slow) for name in RIVALS]


@pytest.mark.parametrize("strategy", _rivals("fedavgm", "feddf"))
def test_a_rival_strategy_never_takes_a_poisoned_update(tmp_path, strategy):
    out = tmp_path / strategy
    summary = simulate(_settings(out, strategy=strategy, poison_clients=1, poison="nan", **RIVALS[strategy]),
                       show_progress=False)
    lines = read_jsonl(out / "clients.jsonl")
    poisoned = [c for c in lines if c.get("injected") == "poison:nan"]
    assert len(poisoned) == 3 and all(c["status"] == "rejected" for c in poisoned)
    state = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.3


def test_fedavgm_without_momentum_at_server_lr_1_is_fedavg(clean_run, tmp_path):
    summary, _ = clean_run
    fedavgm = simulate(_settings(tmp_path / "m0", strategy="fedavgm", server_momentum=0.0, server_lr=1.0),
                       show_progress=False)
    assert fedavgm["accuracy_curve"] == summary["accuracy_curve"]


def _killed_in_round_2(out, *flags) -> None:
    args = [sys.executable, "-m", "simulations.cli", "run", "--dataset", "mnist-5k", "--partition", "dirichlet",
            "--alpha", "0.5", "--clients", "4", "--proxy-size", "100", "--seed", "3", "--rounds", "3",
            "--local-epochs", "1", "--lr", "0.05", "--batch-size", "32", "--ray-num-cpus", "2", "--quiet",
            "--out", str(out), *flags]
    process = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Killed as soon as round 1's checkpoint lands, i.e. inside round 2: on an idle machine
    # a round of this tiny run takes well under a second, so no fixed delay is safe.
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()
    done_before = len(read_jsonl(out / "metrics.jsonl"))
    assert 1 <= done_before < 3


# FedAvg's run (`make test-slow`): the default suite resumes FedAvgM below, the same
# checkpoint path with a server state to restore besides.
@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_the_same_result(clean_run, tmp_path):
    summary, _ = clean_run
    out = tmp_path / "killed"
    _killed_in_round_2(out)
    resumed = simulate(_settings(out, resume=True), show_progress=False)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2, 3]  # each round once
    assert resumed["accuracy_curve"] == summary["accuracy_curve"]


@pytest.mark.parametrize("strategy", _rivals("fedavgm"))
def test_a_rival_strategy_killed_mid_round_resumes_to_the_same_result(tmp_path, strategy):
    options = RIVALS[strategy]
    uninterrupted = simulate(_settings(tmp_path / "whole", strategy=strategy, **options), show_progress=False)
    out = tmp_path / "killed"
    _killed_in_round_2(out, "--strategy", strategy,
                       *[str(x) for key, value in options.items() for x in (f"--{key.replace('_', '-')}", value)])
    resumed = simulate(_settings(out, strategy=strategy, resume=True, **options), show_progress=False)
    assert [m["round"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    assert resumed["accuracy_curve"] == uninterrupted["accuracy_curve"]


def test_resume_plans_only_the_rounds_left_and_restores_the_checkpoint_where_it_was_cut():
    from server.server_app import Phase, plan_phases

    fresh = plan_phases(rounds=3, full_finetune_rounds=2, resume_round=0)
    assert fresh == [Phase(False, 0, 3, restore=False), Phase(True, 3, 5, restore=False)]
    # killed in the projected phase: finish it from the checkpoint, then fold
    assert plan_phases(3, 2, 2) == [Phase(False, 2, 3, restore=True), Phase(True, 3, 5, restore=False)]
    # killed right after the projected phase: nothing left of it, its model is the checkpoint's
    assert plan_phases(3, 2, 3) == [Phase(False, 3, 3, restore=True), Phase(True, 3, 5, restore=False)]
    # killed inside the fine-tuning phase: the checkpoint holds the folded model
    assert plan_phases(3, 2, 4) == [Phase(False, 3, 3, restore=False), Phase(True, 4, 5, restore=True)]
    assert plan_phases(5, 0, 5) == [Phase(False, 5, 5, restore=True)]
