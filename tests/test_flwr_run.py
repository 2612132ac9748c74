"""`flwr run .` drives the same ServerApp and ClientApp through Flower's own runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fusion"])
def test_flwr_run_writes_the_same_run_directory(tmp_path, strategy):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    flwr = [str(Path(sys.executable).parent / "flwr")]
    out = tmp_path / "run"
    try:
        subprocess.run(flwr + ["federation", "simulation-config", "@none/default", "local", "--num-supernodes", "4"],
                       cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        config = f"strategy='{strategy}' dataset='mnist-5k' partition='iid' clients=4 rounds=2 local-epochs=2 lr=0.02 proxy-size=100 out='{out}'"
        proc = subprocess.run(flwr + ["run", ".", "--run-config", config, "--stream"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:  # the local SuperLink outlives `flwr run`; its command line names our FLWR_HOME
        subprocess.run(["pkill", "-f", env["FLWR_HOME"]], check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["clients"] == 4
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.3
    assert len((out / "clients.jsonl").read_text().splitlines()) == 8
    if strategy == "fusion":  # the check's messages went through Flower's runner too
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["check_examples"] > 0 for r in rounds)
