"""Property-based: random flag values and grid files give a valid run or one clear
error, never a traceback. Nothing is run: only what happens before Ray starts."""

import argparse
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulations.cli import build_parser, settings_from_args
from simulations.grid import load_grid

CLEAR_ERRORS = (ValueError, FileNotFoundError)  # SettingsError, DatasetError, ModelError, PartitionError

numbers = st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True), st.just(0))
FLAGS = {
    "--alpha": numbers, "--clients": st.integers(-3, 6000), "--fraction": numbers, "--rounds": st.integers(-2, 50),
    "--local-epochs": st.integers(-2, 5), "--lr": numbers, "--momentum": numbers, "--proxy-size": st.integers(-5, 6000),
    "--classes-per-client": st.integers(-2, 12), "--client-cpus": numbers, "--client-gpus": numbers,
    "--client-failure-rate": numbers, "--poison-clients": st.integers(-2, 20), "--seed": st.integers(-3, 3),
    "--partition": st.sampled_from(["iid", "dirichlet", "pathological", "shards", ""]),
    "--strategy": st.sampled_from(["fedavg", "fedprox", "fusion", "fedsgd"]),
    "--attribution": st.sampled_from(["uniform", "gradxact", "conductance", "lime"]),
    "--fusion-check": st.sampled_from(["clients", "proxy", "off", "loss"]), "--check-samples": st.integers(-2, 600),
    "--fusion-rounds": st.integers(-2, 12),
    "--poison": st.sampled_from(["nan", "inf", "scale", "shape", "zero"]),
    "--dataset": st.sampled_from(["digits", "mnist-5k", "synthetic", "imagenet"]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(FLAGS)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAGS[k] for k in keys})))
def test_random_flags_give_a_clear_error_or_valid_settings(flags):
    argv = ["run", "--model", "simple-cnn", "--dataset", "digits"]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # argparse's own one-line usage error (a float for an int flag)
        return
    assert isinstance(args, argparse.Namespace)
    try:
        run = settings_from_args(args)
        run.validate()
    except CLEAR_ERRORS as err:
        assert str(err) and "Traceback" not in str(err)
        return
    # Accepted settings are sane ones.
    assert run.rounds >= 1 and 0 < run.fraction <= 1 and math.isfinite(run.task.lr) and run.task.lr > 0


toml_values = st.one_of(st.integers(-3, 100), st.floats(allow_nan=False), st.booleans(),
                        st.text(max_size=8), st.lists(st.integers(-1, 3), max_size=3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(top=st.dictionaries(st.sampled_from(["strategies", "seeds", "local_epochs", "target_accuracy", "rounds"]),
                           toml_values, max_size=3),
       base=st.dictionaries(st.sampled_from(["dataset", "clients", "rounds", "lr", "alpha", "model", "colour"]),
                            toml_values, max_size=3))
def test_random_grid_files_give_a_clear_error_or_a_grid(tmp_path_factory, top, base):
    def toml(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\\\", "").replace('"', "").replace("\n", "") + '"'
        if isinstance(value, float) and not math.isfinite(value):
            return "0.5"
        return repr(value) if not isinstance(value, list) else "[" + ", ".join(map(str, value)) + "]"

    text = "".join(f"{k} = {toml(v)}\n" for k, v in top.items())
    text += '[base]\ndataset = "digits"\n' + "".join(f"{k} = {toml(v)}\n" for k, v in base.items() if k != "dataset")
    path = tmp_path_factory.mktemp("grid") / "grid.toml"
    path.write_text(text)
    try:
        grid = load_grid(path, path.parent / "out")
    except CLEAR_ERRORS as err:
        assert str(err)
        return
    assert grid.runs and all(r.settings.rounds >= 1 for r in grid.runs)
