"""Bad input fails fast, with one line naming the problem, before Ray starts and
before anything is written to --out."""

import importlib
import json
import subprocess
import sys
import time

import pytest

from server.results import CHECKPOINT, SUMMARY
from simulations.cli import main

BAD_INPUTS = [
    (["--alpha", "0"], "--alpha must be > 0"),
    (["--alpha", "-1"], "--alpha must be > 0"),
    (["--dataset", "imagenet"], "--dataset must be one of cifar10, digits, fashion-mnist"),
    (["--model", "resnet-9000"], "unknown model 'resnet-9000'"),
    (["--strategy", "fedsgd"], "--strategy must be one of fedadam, fedavg, fedavgm, feddf, fedmedian, fedprox, fedtrimmedavg, fedyogi, fusion, krum, got 'fedsgd'"),
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
    (["--strategy", "fedavgm", "--server-momentum", "-0.5"], "--server-momentum must be in [0, 1), got -0.5"),
    (["--strategy", "fedavgm", "--server-lr", "0"], "--server-lr must be a positive number, got 0.0"),
    (["--strategy", "fedadam", "--tau", "0"], "--tau must be a positive number, got 0.0"),
    (["--strategy", "fedyogi", "--beta-2", "1"], "--beta-2 must be in [0, 1), got 1.0"),
    (["--strategy", "feddf", "--distill-steps", "0"], "--distill-steps must be a positive whole number"),
    (["--strategy", "feddf", "--distill-lr", "-1"], "--distill-lr must be a positive number"),
    (["--strategy", "feddf", "--distill-check", "maybe"], "--distill-check must be one of clients, proxy, off"),
    (["--strategy", "feddf", "--proxy-size", "8"], "--strategy feddf merges the clients' models on the server's "
                                                   "proxy set: --proxy-size must be at least 32"),
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
    assert f"no {SUMMARY}" in capsys.readouterr().err


def test_resume_refuses_a_run_directory_of_other_settings_or_a_broken_checkpoint(tmp_path):
    from server.results import RunDirectory
    from server.server_app import _resumable, _resume_point
    from server.settings import RunSettings, SettingsError

    out = RunDirectory(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    settings = RunSettings.from_mapping({"out": str(tmp_path), "resume": True})
    out.save_checkpoint({"round": 2, "settings": _resumable(RunSettings.from_mapping({"lr": 0.5})), "arrays": {},
                         "history": []})
    with pytest.raises(SettingsError, match=r"other settings \(lr\)"):
        _resume_point(out, settings)
    (tmp_path / CHECKPOINT).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable fedfuse checkpoint"):
        _resume_point(out, settings)


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_the_cli_has_five_user_commands_and_the_lab_lists_its_benchmarks(capsys):
    from simulations.cli import LAB

    usage = _help(capsys, ["--help"]).splitlines()[0]
    assert usage.endswith("{run,bench,compare,fuse,lab} ...")
    listing = _help(capsys, ["lab", "--help"])
    for name, module_name in LAB.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main)
        assert "\n" not in module.HELP and name in listing
        assert " ".join(module.HELP.split()[:4]) in " ".join(listing.split())  # the help line, however wrapped
    assert "--rounds" in _help(capsys, ["lab", "soak", "--help"])


def test_fedfuse_run_imports_no_lab_module():
    code = ("import sys; from simulations.cli import LAB, build_parser; build_parser(['run']).parse_args(['run']); "
            "print(sorted(set(LAB.values()) & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_bad_lab_and_bench_input_exits_with_one_line(tmp_path, capsys):
    out = tmp_path / "soak"
    assert main(["lab", "soak", "--dataset", "digits", "--rounds", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedfuse: error: --rounds must be a positive whole number, got 0" and not out.exists()
    assert main(["bench", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "grid")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedfuse: error: no grid file")


def _finished_run(run_dir, strategy: str, model: str, accuracies: list[float], fused: int | None = None):
    """The summary.json of a tiny finished run, with the fields the final tables read."""
    run_dir.mkdir(parents=True)
    summary = {"strategy": strategy, "dataset": "fashion-mnist", "partition": "dirichlet", "alpha": 0.1,
               "classes_per_client": 2, "clients": 10, "model": model, "projection": model != "simple-cnn",
               "rounds": len(accuracies) - 1, "initial_accuracy": accuracies[0], "final_accuracy": accuracies[-1],
               "best_accuracy": max(accuracies[1:]), "accuracy_curve": accuracies, "bytes_up": 1_790_560_000,
               "bytes_down": 5_371_680_000, "mean_round_s": 1093.891, "mean_aggregate_s": 2.7,
               "mean_fusion_s": 2.2 if fused is not None else None, "mean_clients_used": 10.0,
               "rounds_fusion_selected": fused, "wall_s": 115.8}
    (run_dir / SUMMARY).write_text(json.dumps(summary))
    return run_dir


@pytest.mark.parametrize("models", [("simple-cnn", "simple-cnn"), ("simple-cnn", "efficientnet-lite0")],
                         ids=["one setup", "two setups"])
def test_final_tables_fit_100_columns_and_cut_no_cell(tmp_path, capsys, models):
    from rich.console import Console

    from simulations.tables import curve_tables, summary_table

    curve = [0.0959, 0.3441, 0.6359, 0.7164, 0.7611, 0.8076]
    runs = [_finished_run(tmp_path / "simple-cnn-e1-dir0.1-fedavg-uniform-clients-s0", "fedavg", models[0], curve),
            _finished_run(tmp_path / "efficientnet-lite0-e5-dir0.1-fusion-uniform-s12", "fusion", models[1],
                          curve[:3], fused=1)]
    console = Console(width=100, record=True)
    for table in [*curve_tables(runs), summary_table(runs, title="comparison")]:
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "…" not in text
    for cell in ("0.8076", "0.7164", "1791/5372", "1093.89", "1/2", "fusion", "fedavg"):
        assert cell in text, cell
    assert ("setup" in text) == (models[0] != models[1])
    assert main(["compare", *map(str, runs)]) == 0 and "0.8076" in capsys.readouterr().out
