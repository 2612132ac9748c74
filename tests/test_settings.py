"""Run settings are declared once: the `fedfuse run` flags, a grid file's keys, `flwr run .`'s
config and the clients' message all take the same names and refuse the same bad values
with the same line."""

import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import strategies
from clients.task import TrainTask
from data.settings import declared, flag
from server.server_app import settings_from_run_config
from server.settings import RunSettings, SettingsError, flwr_run_config, resolve_server_device
from simulations.cli import build_parser, main
from simulations.grid import STRATEGY_VARIANTS, load_grid

ROOT = Path(__file__).resolve().parents[1]
NAMES = [name for name, _, _ in declared(RunSettings)]


def _pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _run_flags() -> set[str]:
    run = build_parser(["run"])._subparsers._group_actions[0].choices["run"]
    return {s for action in run._actions for s in action.option_strings if s.startswith("--") and not
            s.startswith("--no-")} - {"--help", "--quiet", "--verbose"}


def test_setting_names_are_unique_across_the_nested_declarations():
    assert len(NAMES) == len(set(NAMES)) > 40


def test_every_setting_is_a_flag_and_every_flag_a_setting():
    assert _run_flags() == {flag(name) for name in NAMES}


def test_flwr_run_config_holds_the_declared_settings_at_their_defaults():
    config = _pyproject_run_config()
    expected = flwr_run_config()
    assert set(config) == set(expected)
    assert {k: v for k, v in config.items() if k != "out"} == {k: v for k, v in expected.items() if k != "out"}
    assert settings_from_run_config(config) == RunSettings.from_mapping({"out": config["out"]})


def test_a_grid_file_takes_every_setting_the_grid_does_not_set_itself(tmp_path):
    base = {name: f.default for name, f, _ in declared(RunSettings)
            if name not in ("seed", "local_epochs", "strategy", "out")}
    base.update(dataset="digits", clients=4, proxy_size=50, rounds=1)
    lines = [f"{k.replace('_', '-')} = {_toml(v)}" for k, v in base.items()]
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text('strategies = ["fedavg"]\n[base]\n' + "\n".join(lines) + "\n")
    grid = load_grid(grid_file, tmp_path / "out")
    federated = [r for r in grid.runs if r.strategy == "fedavg"]
    assert len(federated) == 1 and federated[0].settings.federation.clients == 4


def test_the_clients_task_survives_its_message():
    settings = RunSettings.from_mapping({"strategy": "fusion", "lr": 0.2, "local_epochs": 3, "alpha": 0.1})
    task = replace(settings.train_task(), proximal_mu=0.5, server_round=4)
    config = task.to_config()
    assert all(isinstance(v, (int, float, str, bool)) for v in config.values())
    assert TrainTask.from_config({**config, "check-samples": 10}) == task


def test_the_clients_task_asks_for_fusion_inputs_only_under_fusion():
    fedavg = RunSettings.from_mapping({"strategy": "fedavg"}).train_task()
    fusion = RunSettings.from_mapping({"strategy": "fusion"}).train_task()
    assert (fedavg.attribution, fedavg.share_class_counts) == ("", False)
    assert (fusion.attribution, fusion.share_class_counts) == ("gradxact", True)


def test_fusion_defaults_to_the_blended_policy_and_offers_blends_only_to_the_clients_check():
    default = RunSettings.from_mapping({"strategy": "fusion"})
    assert (default.fusion_train_from, default.fusion_refine_steps, default.fusion_blends) == ("average", 2000, 4)
    assert default.fusion_head_target == "log-probs"
    for check in ("proxy", "off"):
        other = RunSettings.from_mapping({"strategy": "fusion", "fusion-check": check, "dataset": "digits",
                                          "proxy-size": 100})
        assert other.fusion_blends == 1
        other.validate()  # no blends to refuse
    explicit = RunSettings.from_mapping({"strategy": "fusion", "fusion-check": "proxy", "fusion-blends": 4})
    with pytest.raises(SettingsError, match="--fusion-blends 4 offers the clients' check more candidates"):
        explicit.validate()


def test_wrong_types_and_unknown_names_are_refused():
    with pytest.raises(SettingsError, match=r"--rounds must be int, got 1.5"):
        RunSettings.from_mapping({"rounds": 1.5})
    with pytest.raises(SettingsError, match=r"unknown setting 'learning-rate'"):
        RunSettings.from_mapping({"learning-rate": 0.1})
    assert RunSettings.from_mapping({"momentum": 0}).task.momentum == 0.0  # a whole number is a float


BAD = [
    ("alpha", 0.0, "--alpha must be > 0 (smaller is more skewed), got 0.0"),
    ("rounds", 0, "--rounds must be a positive whole number, got 0"),
    ("fraction", 1.5, "--fraction must be in (0, 1], got 1.5"),
    ("strategy", "fedsgd", f"--strategy must be one of {', '.join(strategies.names())}, got 'fedsgd'"),
    ("attribution", "saliency", "--attribution must be one of uniform, gradxact, conductance, got 'saliency'"),
    ("client_failure_rate", 1.0, "--client-failure-rate must be in [0, 1), got 1.0"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[b[0] for b in BAD])
def test_the_three_doors_refuse_a_bad_value_with_the_same_line(tmp_path, capsys, name, value, message):
    key = name.replace("_", "-")
    # fedfuse run
    assert main(["run", f"--{key}", str(value), "--dataset", "digits", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"fedfuse: error: {message}"
    # a grid file (the strategy is the grid's own list; the others go in a partition table)
    grid_file = tmp_path / "grid.toml"
    if name == "strategy":
        grid_file.write_text(f'strategies = ["{value}"]\n')
    else:
        grid_file.write_text(f'strategies = ["fedavg"]\n[[partitions]]\npartition = "dirichlet"\n'
                             f'{key} = {_toml(value)}\n[base]\ndataset = "digits"\n')
    with pytest.raises(SettingsError) as grid_error:
        load_grid(grid_file, tmp_path / "grid")
    assert str(grid_error.value).endswith(message if name != "strategy" else
                                          f"unknown strategy 'fedsgd': choose from {', '.join(STRATEGY_VARIANTS)}")
    # flwr run . --run-config
    with pytest.raises(SettingsError) as flwr_error:
        settings_from_run_config({**_pyproject_run_config(), "dataset": "digits", key: value})
    assert str(flwr_error.value) == message
    assert not (tmp_path / "run").exists()


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_a_server_setting_never_fills_the_internal_field_of_the_same_name():
    # FedProx's mu is a server setting; the clients' own proximal_mu is set by FedProx's message only
    settings = RunSettings.from_mapping({"strategy": "fedavg", "proximal_mu": 0.5})
    assert settings.proximal_mu == 0.5 and settings.train_task().proximal_mu == 0.0


def test_the_server_device_is_resolved_and_checked_before_any_work(tmp_path, capsys):
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_server_device("auto") == torch.device("cuda:0" if visible else "cpu")
    assert RunSettings.from_mapping({"strategy": "fusion"}).strategy_options()["server_device"] == \
        str(resolve_server_device("auto"))
    with pytest.raises(SettingsError, match=r"--server-device 'tpu': choose auto, cpu, cuda or cuda:N"):
        resolve_server_device("tpu")
    with pytest.raises(SettingsError, match=rf"this process sees {visible} CUDA device\(s\); use auto or cpu"):
        resolve_server_device(f"cuda:{visible}")
    # Only the strategies that merge on the server check it; the run stops before Ray starts.
    assert main(["run", "--strategy", "feddf", "--server-device", f"cuda:{visible}", "--dataset", "digits",
                 "--proxy-size", "100", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "--server-device" in capsys.readouterr().err and not (tmp_path / "run").exists()
    fedavg = RunSettings.from_mapping({"strategy": "fedavg", "server-device": f"cuda:{visible}", "dataset": "digits"})
    fedavg.validate()
    assert fedavg.strategy_options()["server_device"] == "cpu"
