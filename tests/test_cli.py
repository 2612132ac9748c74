"""Bad input fails fast, with one line naming the problem, before Ray starts and
before anything is written to --out."""

import subprocess
import sys
import time

import pytest

from simulations.cli import main

BAD_INPUTS = [
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--alpha", "-1"], "--alpha must be > 0"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--model", "resnet-9000"], "unknown model 'resnet-9000'"),
    (["--strategy", "fedsgd"], "unknown --strategy 'fedsgd'"),
    (["--dataset", "digits", "--clients", "5000"], "more than the 438 training samples"),
    (["--dataset", "digits", "--partition", "pathological", "--classes-per-client", "11"],
     "--classes-per-client 11 is more than the dataset's 10 classes"),
    (["--data-root", "/nonexistent/fmnist"], "apt-get install dataset-fashion-mnist"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/cifar"], "CIFAR-10 not found"),
    (["--rounds", "0"], "--rounds must be a positive whole number"),
    (["--fraction", "1.5"], "--fraction must be in (0, 1]"),
    (["--dataset", "digits", "--proxy-size", "5000"], "--proxy-size 5000 must be between"),
    (["--projection", "--pointwise", "squeeze"], "--pointwise must be one of project, freeze, train"),
    (["--full-finetune-rounds", "2"], "continues a projected run: add --projection"),
    (["--model", "timm:resnet18", "--weights", "/nonexistent.pth"], "--weights /nonexistent.pth does not exist"),
    (["--model", "simple-cnn", "--resolution", "64"], "simple-cnn takes 28x28 input"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    import ray

    out = tmp_path / "run"
    code = main(["run", *args, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err, err
    assert len(err.splitlines()) == 1 and err.startswith("fedfuse: error: ")
    assert not out.exists()
    assert not ray.is_initialized()


def test_bad_input_fails_within_seconds_from_the_shell(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "run", "--alpha", "0", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2 and "--alpha must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"


def test_compare_refuses_a_directory_without_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
