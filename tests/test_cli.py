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
    (["--strategy", "fusion", "--attribution", "saliency"], "--attribution must be one of"),
    (["--strategy", "fusion", "--fusion-check", "loss"], "--fusion-check must be one of clients, proxy, off"),
    (["--strategy", "fusion", "--check-samples", "0"], "--check-samples must be a positive whole number"),
    (["--strategy", "fusion", "--fusion-rounds", "-1"], "--fusion-rounds must be a whole number >= 0"),
    (["--strategy", "fusion", "--proxy-size", "8"], "--proxy-size must be at least 32"),
    (["--client-failure-rate", "1.0"], "--client-failure-rate must be in [0, 1)"),
    (["--poison-clients", "11"], "--poison-clients must be a whole number from 0 to --clients"),
    (["--poison-clients", "1", "--poison", "flip"], "--poison must be one of nan, inf, scale, shape"),
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


def test_resume_refuses_a_run_directory_of_other_settings_or_a_broken_checkpoint(tmp_path):
    from server.results import RunDirectory
    from server.server_app import _resumable, _resume_point
    from server.settings import RunSettings, SettingsError

    out = RunDirectory(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    settings = RunSettings(out=str(tmp_path), resume=True)
    out.save_checkpoint({"round": 2, "settings": _resumable(RunSettings(lr=0.5)), "arrays": {}, "history": []})
    with pytest.raises(SettingsError, match=r"other settings \(lr\)"):
        _resume_point(out, settings)
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable fedfuse checkpoint"):
        _resume_point(out, settings)
