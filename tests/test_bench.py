"""The benchmark grid: config checks, outputs, resume, failures."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from server.results import SUMMARY, is_finished
from server.settings import SettingsError
from simulations import bench
from simulations.grid import load_grid

SMOKE = Path(__file__).parent.parent / "simulations" / "configs" / "smoke.toml"


def _grid_file(tmp_path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('strategies = ["fedavg"]\nrounds = 3\n', "unknown key"),
    ('strategies = ["fedsgd"]\n', "unknown strategy 'fedsgd'"),
    ('strategies = ["fedavg"]\n[base]\nrouns = 3\n', "unknown setting 'rouns'"),
    ('strategies = ["fedavg"]\n[base]\nrounds = "ten"\n', "--rounds must be int"),
    ('strategies = ["fedavg"]\n[[partitions]]\npartition = "dirichlet"\nalpha = 0.0\n', "--alpha must be > 0"),
    ('strategies = ["fedavg"]\nseeds = []\n', "'seeds' must be a non-empty list"),
    ('strategies = ["fedavg"]\n[base]\nseed = 1\n', "set by the grid"),
    ('strategies = ["fedavg"\n', "not valid TOML"),
    ('strategies = ["fedavg"]\n[[models]]\nmodel = "simple-cnn"\nstrategies = ["fedprox"]\n',
     "strategies ['fedprox'] are not in the grid's 'strategies'"),
    ('strategies = ["fedavg"]\n[[models]]\nmodel = "simple-cnn"\nsplits = ["dir0.3"]\n',
     "splits ['dir0.3'] match no [[partitions]] table"),
    ('strategies = ["fedavg"]\n[[partitions]]\npartition = "iid"\nstrategies = ["krum"]\n',
     "strategies ['krum'] are not in the grid's 'strategies'"),
    ('strategies = ["fedavg"]\n[[models]]\nmodel = "simple-cnn"\nlocal_epochs = 2\n',
     "'local_epochs' must be a non-empty list of int"),
])
def test_bad_grid_files_are_refused_before_any_run(tmp_path, text, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_grid(_grid_file(tmp_path, text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_grid_expands_strategies_splits_epochs_models_and_seeds(tmp_path):
    grid = load_grid(Path(__file__).parent.parent / "simulations" / "configs" / "fmnist-noniid.toml", tmp_path)
    federated = [r for r in grid.runs if r.strategy != "centralised"]
    # The small CNN: 8 strategies x 3 splits x 2 epoch counts; EfficientNet's slice: 5 x 2 x 1.
    assert len(federated) == (8 * 3 * 2 + 5 * 2 * 1) * 3 and len(grid.runs) - len(federated) == (2 + 1) * 3
    effnet_settings = {r.setting for r in federated if r.settings.train_task().model == "efficientnet-lite0"}
    # Its clients take 93 local steps a round, whatever their shard; the label says so.
    assert effnet_settings == {"efficientnet-lite0-k93-dir0.1", "efficientnet-lite0-k93-C2"}
    assert {r.settings.train_task().local_steps for r in grid.runs if "efficientnet" in r.run_id} == {93}
    assert {r.settings.train_task().local_steps for r in grid.runs if "simple-cnn" in r.run_id} == {0}
    assert not [r for r in federated if r.settings.train_task().model != "simple-cnn" and r.strategy == "feddf"]
    fedavgm = [r for r in federated if r.strategy == "fedavgm"]
    assert fedavgm and all(r.settings.server_momentum == 0.9 for r in fedavgm)
    uniform = [r for r in federated if r.strategy == "fusion-uniform"]
    assert all(r.settings.strategy == "fusion" and r.settings.train_task().attribution == "uniform" for r in uniform)
    # EfficientNet's fusion is unrefined here (the CPU's minutes), the small CNN's refined.
    refine = {(r.settings.model, r.settings.fusion_refine_steps) for r in federated if r.strategy == "fusion"}
    assert refine == {("simple-cnn", 2000), ("efficientnet-lite0", 0)}
    effnet = [r.settings.train_task() for r in grid.runs if r.settings.train_task().model == "efficientnet-lite0"]
    assert effnet and all(task.projection and task.resolution == 32 and task.momentum == 0 for task in effnet)
    # Same seed, same split: every strategy runs on the same partition.
    same = [r.settings.federation for r in federated if r.setting == "simple-cnn-e1-dir0.1" and r.seed == 1]
    assert len(same) == 8 and len(set(same)) == 1


@pytest.mark.parametrize("config", sorted((SMOKE.parent).glob("*.toml")), ids=lambda path: path.stem)
def test_every_shipped_grid_loads_and_few_round_runs_its_rivals(tmp_path, config):
    grid = load_grid(config, tmp_path)
    assert grid.runs and all(r.settings.rounds >= 1 for r in grid.runs)
    if config.stem == "few-round":
        strategies = {r.strategy for r in grid.runs}
        assert {"fedavg", "fedprox", "fedavgm", "feddf", "fusion", "fusion-uniform"} <= strategies
        assert {(r.settings.rounds, r.settings.train_task().local_epochs) for r in grid.runs if r.strategy != "centralised"} == {(3, 20)}
        policies = {r.strategy: (r.settings.fusion_train_from, r.settings.fusion_refine_steps > 0, r.settings.fusion_blends,
                                 r.settings.fusion_head_target) for r in grid.runs if r.strategy.startswith("fusion")}
        assert policies == {"fusion": ("average", True, 4, "log-probs"), "fusion-uniform": ("average", True, 4, "log-probs")}
    if config.stem == "one-shot":
        plain = {r.settings.fusion_head_target for r in grid.runs if r.strategy.startswith("fusion-plain")}
        assert plain == {"logits"}  # the first policy, whole
    if config.stem == "byzantine":
        settings = {r.setting for r in grid.runs if r.strategy != "centralised"}
        assert "simple-cnn-e1-dir0.1" in settings and "simple-cnn-e1-dir0.1-sign-flip-x2" in settings
        assert len(settings) == 2 * 7  # each split clean, under each of the 5 attacks, and the absent reference
        # An attack runs against the strategies that use what it lies about (the others' runs
        # would repeat the clean ones): histograms only fusion reads, sizes FedAvg and fusion weigh by.
        reached = {}
        for r in grid.runs:
            reached.setdefault(r.setting, set()).add(r.strategy)
        assert reached["simple-cnn-e1-dir0.1-lie-counts-x2"] == {"fusion"}
        assert reached["simple-cnn-e1-dir0.1-lie-size-x2"] == {"fedavg", "fusion"}
        assert reached["simple-cnn-e1-dir0.1-noise-x2"] == {"fedavg", "krum", "fedmedian", "fedtrimmedavg", "fusion"}
        assert reached["simple-cnn-e1-dir0.5-absent-x2"] == {"fedavg", "fusion"}


def test_a_failing_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    calls = []

    def failing(run):
        calls.append(run.run_id)
        raise RuntimeError("client crashed")

    monkeypatch.setattr(bench, "_run_one", failing)
    counts = bench.run_grid(str(SMOKE), str(tmp_path), quiet=True)
    assert counts == {"done": 0, "kept": 0, "failed": 3} and len(calls) == 3
    report = (tmp_path / "report.md").read_text()
    assert report.count("RuntimeError: client crashed") == 3


def test_only_runs_the_matching_slice_of_the_grid(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "_run_one", lambda run: calls.append(run.run_id))
    headline = str(SMOKE.parent / "fmnist-noniid.toml")
    counts = bench.run_grid(headline, str(tmp_path), quiet=True, only=["simple-cnn-e1-dir0.1-*-s0"])
    strategies = ("fedavg", "fedavgm", "feddf", "fedprox", "fusion", "fusion-plain", "fusion-plain-uniform",
                  "fusion-uniform")
    assert counts == {"done": len(strategies), "kept": 0, "failed": 0}
    assert sorted(calls) == sorted(f"simple-cnn-e1-dir0.1-{s}-s0" for s in strategies)
    with pytest.raises(ValueError, match="matches no run"):
        bench.run_grid(headline, str(tmp_path / "other"), quiet=True, only=["resnet-*"])
    assert not (tmp_path / "other").exists()


def _rows(strategy: str, seed: int, accuracies: list[float]) -> list[dict]:
    return [{"run": f"{strategy}-s{seed}", "setting": "m-dir0.1", "strategy": strategy, "seed": seed,
             "round": r, "accuracy": a, "bytes_total": 0} for r, a in enumerate(accuracies)]


def test_against_fedavg_pairs_seeds_and_counts_rounds_to_fedavg_final():
    from simulations.report import against_fedavg

    rows = (_rows("fedavg", 0, [0.1, 0.5, 0.6, 0.7]) + _rows("fedavg", 1, [0.1, 0.4, 0.6, 0.6])
            + _rows("fusion", 0, [0.1, 0.7, 0.72, 0.75]) + _rows("fusion", 1, [0.1, 0.3, 0.4, 0.5])
            + _rows("fusion", 2, [0.1, 0.9, 0.9, 0.9]))  # seed 2 has no FedAvg run: not paired
    (line,) = against_fedavg(rows)
    assert line["seeds"] == 2 and line["wins"] == 1
    assert line["delta_mean"] == pytest.approx((0.05 - 0.1) / 2)
    assert line["delta_std"] == pytest.approx(0.15 / 2 ** 0.5)  # sample std of +0.05 and -0.1
    assert line["reached"] == 1 and line["rounds_to_fedavg_final"] == 1  # seed 0: 0.7 >= 0.7 in round 1
    assert line["fedavg_rounds"] == pytest.approx((3 + 2) / 2)
    # Means of rounds 1-3: seed 0 0.7233 - 0.6, seed 1 0.4 - 0.5333.
    assert line["last_delta_mean"] == pytest.approx(((0.72333 - 0.6) + (0.4 - 0.53333)) / 2, abs=1e-4)


def test_against_best_rival_takes_each_rounds_best_rival_over_shared_seeds():
    from simulations.report import against_best_rival

    rows = (_rows("fedavg", 0, [0.1, 0.5, 0.8]) + _rows("fedavg", 1, [0.1, 0.3, 0.8])
            + _rows("feddf", 0, [0.1, 0.6, 0.7]) + _rows("feddf", 1, [0.1, 0.6, 0.7])
            + _rows("fusion", 0, [0.1, 0.7, 0.75]) + _rows("fusion", 1, [0.1, 0.8, 0.85])
            + _rows("fusion", 2, [0.1, 0.9, 0.9])  # seed 2 has no rival: not paired
            + [{**row, "setting": "m-union"} for row in _rows("centralised", 0, [0.1, 0.9, 0.9])])
    lines = {line["round"]: line for line in against_best_rival(rows)}
    assert set(lines) == {1, 2} and all(line["seeds"] == 2 for line in lines.values())
    assert lines[1]["rival"] == "feddf" and lines[1]["delta_mean"] == pytest.approx(0.15)  # 0.1 and 0.2
    assert lines[2]["rival"] == "fedavg" and lines[2]["delta_mean"] == pytest.approx(0.0)  # -0.05 and +0.05
    # Ten rounds are not few: no table.
    assert against_best_rival(_rows("fedavg", 0, [0.1] * 11) + _rows("fusion", 0, [0.2] * 11)) == []


def _attacked_grid(tmp_path, attack_table: str):
    """FedAvg and Krum on one split, clean and with one attacker (`attack_table`)."""
    return load_grid(_grid_file(tmp_path, 'strategies = ["fedavg", "krum"]\nseeds = [0, 1]\n[base]\n'
                                          'dataset = "mnist-5k"\nclients = 8\n[[partitions]]\npartition = "dirichlet"\n'
                                          'alpha = 0.1\n[[partitions]]\npartition = "dirichlet"\nalpha = 0.1\n'
                                          'attackers = 1\n' + attack_table), tmp_path / "out")


def _setting_rows(*runs) -> list[dict]:
    """Report rows of (setting, strategy, seed, accuracies) runs."""
    return [{**row, "setting": setting} for setting, strategy, seed, accuracies in runs
            for row in _rows(strategy, seed, accuracies)]


def test_under_attack_pairs_each_strategy_with_its_own_clean_run(tmp_path):
    from simulations.report import under_attack

    grid = _attacked_grid(tmp_path, 'attack = "noise"\n')
    clean, attacked = "simple-cnn-e1-dir0.1", "simple-cnn-e1-dir0.1-noise-x1"
    assert {r.setting for r in grid.runs} >= {clean, attacked}
    records = _setting_rows((clean, "fedavg", 0, [0.1, 0.7]), (clean, "fedavg", 1, [0.1, 0.8]),
                            (attacked, "fedavg", 0, [0.1, 0.4]), (attacked, "fedavg", 1, [0.1, 0.6]),
                            (clean, "krum", 0, [0.1, 0.6]), (attacked, "krum", 0, [0.1, 0.65]))
    lines = {line["strategy"]: line for line in under_attack(records, grid)}
    assert set(lines) == {"fedavg", "krum"} and lines["krum"]["seeds"] == 1
    assert lines["fedavg"]["delta_mean"] == pytest.approx(-0.25)  # -0.3 and -0.2, each against its own seed
    assert lines["krum"]["delta_mean"] == pytest.approx(0.05)
    assert lines["fedavg"]["reached"] and lines["krum"]["reached"]


def test_under_attack_lists_a_strategy_the_attack_does_not_reach_at_its_clean_seeds(tmp_path):
    from simulations.report import under_attack

    grid = _attacked_grid(tmp_path, 'attack = "lie-size"\nstrategies = ["fedavg"]\n')
    clean, attacked = "simple-cnn-e1-dir0.1", "simple-cnn-e1-dir0.1-lie-size-x1"
    assert {(r.setting, r.strategy) for r in grid.runs if r.setting == attacked} == {(attacked, "fedavg")}
    records = _setting_rows((clean, "fedavg", 0, [0.1, 0.7]), (attacked, "fedavg", 0, [0.1, 0.5]),
                            (clean, "krum", 0, [0.1, 0.6]), (clean, "krum", 1, [0.1, 0.65]))
    lines = {line["strategy"]: line for line in under_attack(records, grid)}
    assert lines["fedavg"]["reached"] and lines["fedavg"]["delta_mean"] == pytest.approx(-0.2)
    assert not lines["krum"]["reached"] and lines["krum"]["seeds"] == 2 and lines["krum"]["delta_mean"] == 0


def test_under_attack_sets_each_attack_against_the_absent_reference_where_there_is_one(tmp_path):
    from simulations.report import under_attack

    grid = _attacked_grid(tmp_path, 'attack = "noise"\n[[partitions]]\npartition = "dirichlet"\nalpha = 0.1\n'
                                    'attackers = 1\nattack = "absent"\nstrategies = ["fedavg"]\n')
    clean, attacked, absent = ("simple-cnn-e1-dir0.1", "simple-cnn-e1-dir0.1-noise-x1",
                               "simple-cnn-e1-dir0.1-absent-x1")
    records = _setting_rows((clean, "fedavg", 0, [0.1, 0.7]), (clean, "fedavg", 1, [0.1, 0.8]),
                            (attacked, "fedavg", 0, [0.1, 0.4]), (attacked, "fedavg", 1, [0.1, 0.6]),
                            (absent, "fedavg", 0, [0.1, 0.65]), (clean, "krum", 0, [0.1, 0.6]),
                            (attacked, "krum", 0, [0.1, 0.65]))
    lines = {(line["setting"], line["strategy"]): line for line in under_attack(records, grid)}
    # The reference itself: what the attacker's data was worth to FedAvg (seed 0 only).
    assert lines[absent, "fedavg"]["delta_mean"] == pytest.approx(-0.05) and lines[absent, "fedavg"]["beyond_mean"] is None
    # Noise took 0.25 of FedAvg's final accuracy from seed 0 beyond the reference; seed 1 has no reference.
    assert lines[attacked, "fedavg"]["beyond_mean"] == pytest.approx(-0.25) and lines[attacked, "fedavg"]["absent_seeds"] == 1
    assert lines[attacked, "krum"]["beyond_mean"] is None
    # Krum has no reference run, and no "not reached" row for one: absent is not an attack.
    assert (absent, "krum") not in lines


def _finished_beside(grid: Path, run_id: str, wall: float, rounds: int, epochs: int,
                     model: str = "simple-cnn") -> None:
    """A finished run in another grid's folder, as the plan reads it: wall time and config."""
    run = grid / "runs" / run_id
    run.mkdir(parents=True)
    (run / SUMMARY).write_text(json.dumps({"wall_s": wall}))
    (run / "config.json").write_text(json.dumps({"model": model, "rounds": rounds, "local_epochs": epochs}))


def test_the_plan_estimates_pending_runs_from_finished_ones_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_run_one", lambda run: pytest.fail("--plan must not run anything"))
    config = _grid_file(tmp_path, 'strategies = ["fedavg", "fusion", "fusion-uniform", "fedprox"]\nseeds = [0, 1]\nlocal_epochs = [1, 3]\n'
                                  '[base]\ndataset = "mnist-5k"\nclients = 4\n')
    out = tmp_path / "out"
    finished = {"simple-cnn-e1-dir0.5-fedavg-s0": 60.0, "simple-cnn-e1-dir0.5-fedavg-s1": 120.0,
                "simple-cnn-e1-dir0.5-fusion-s0": 300.0, "simple-cnn-e3-dir0.5-fusion-s1": 600.0}
    for run_id, wall in finished.items():
        (out / "runs" / run_id).mkdir(parents=True)
        (out / "runs" / run_id / SUMMARY).write_text(f'{{"wall_s": {wall}}}')
    # A grid beside it ran fusion-uniform in another regime (one round, 20 epochs): the
    # variant in this grid is the better guide.
    _finished_beside(tmp_path / "one-shot", "simple-cnn-e20-dir0.5-fusion-uniform-s0", 30.0, rounds=1, epochs=20)
    plan = {(line["local_epochs"], line["strategy"]): line for line in bench.plan_grid(str(config), str(out))}
    assert plan[1, "fedavg"]["pending"] == 0 and plan[1, "fedavg"]["minutes_per_run"] == pytest.approx(1.5)
    assert plan[1, "fusion"]["pending"] == 1 and plan[1, "fusion"]["pending_hours"] == pytest.approx(300 / 3600)
    assert plan[3, "fusion"]["minutes_per_run"] == pytest.approx(10.0)  # its own finished run, not the scaled e1
    # No 3-epoch FedAvg run finished: the 1-epoch ones, times 3 epochs; centralised has nothing to go by.
    assert plan[3, "fedavg"]["basis"] == "scaled from other local epochs"
    assert plan[3, "fedavg"]["pending_hours"] == pytest.approx(2 * 3 * 90 / 3600)
    assert plan[3, "centralised"]["pending"] == 2 and plan[3, "centralised"]["pending_hours"] is None
    # No fusion-uniform run: the variant whose settings differ least, fusion.
    assert plan[1, "fusion-uniform"]["basis"] == "like fusion's"
    assert plan[1, "fusion-uniform"]["minutes_per_run"] == pytest.approx(5.0)
    # No FedProx run at all: FedAvg's time for the same epochs, as a lower bound.
    assert plan[1, "fedprox"]["basis"] == "at least FedAvg's (measured)"
    assert plan[1, "fedprox"]["pending_hours"] == pytest.approx(2 * 90 / 3600)
    assert plan[3, "fedprox"]["basis"] == "at least FedAvg's (scaled from other local epochs)"
    # A slice lists its own runs only, still estimated from every finished run of the grid.
    sliced = bench.plan_grid(str(config), str(out), only=["*-e3-*-fedavg-s1"])
    assert [(line["local_epochs"], line["strategy"], line["finished"], line["pending"]) for line in sliced] == [
        (3, "fedavg", 0, 1)]
    assert sliced[0]["minutes_per_run"] == pytest.approx(3 * 90 / 60)
    assert not (out / "report.md").exists()


def test_a_new_grid_is_estimated_from_the_same_strategy_in_the_grids_beside_it(tmp_path):
    config = _grid_file(tmp_path, 'strategies = ["fedavg", "fusion"]\nlocal_epochs = [1, 2]\n'
                                  '[base]\ndataset = "mnist-5k"\nclients = 4\nrounds = 3\n')
    other = tmp_path / "other"
    _finished_beside(other, "simple-cnn-e1-dir0.5-fusion-s0", 400.0, rounds=4, epochs=1)  # 100 s a round
    _finished_beside(other, "simple-cnn-e5-C2-fusion-s1", 900.0, rounds=3, epochs=5)  # 300 s a round of 5 epochs
    _finished_beside(other, "simple-cnn-e1-dir0.5-fusion-uniform-s0", 9999.0, rounds=4, epochs=1)  # another label
    _finished_beside(other, "resnet18-e1-dir0.5-fusion-s0", 9999.0, rounds=4, epochs=1, model="resnet18")
    plan = {(line["local_epochs"], line["strategy"]): line
            for line in bench.plan_grid(str(config), str(tmp_path / "out"))}
    assert plan[1, "fusion"]["basis"] == "from other, scaled by rounds"
    assert plan[1, "fusion"]["minutes_per_run"] == pytest.approx(100 * 3 / 60)
    # No 2-epoch run beside it: every one, scaled by rounds x epochs.
    assert plan[2, "fusion"]["basis"] == "from other, scaled by rounds x epochs"
    assert plan[2, "fusion"]["minutes_per_run"] == pytest.approx((100 * 3 * 2 + 300 * 3 * 2 / 5) / 2 / 60)
    assert plan[1, "fedavg"]["minutes_per_run"] is None


def _report_finals(report: str) -> dict[tuple[str, str], tuple[float, float]]:
    """The main table's (final accuracy, last-rounds mean) per (setting, strategy)."""
    finals = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and re.fullmatch(r"[0-9.]+( ± [0-9.]+)?", cells[3]):
            finals[(cells[0], cells[1])] = (float(cells[3].split("±")[0]), float(cells[4].split("±")[0]))
    return finals


def test_smoke_grid_writes_every_output_and_resumes_without_redoing_runs(tmp_path):
    first = bench.run_grid(str(SMOKE), str(tmp_path), limit=1, quiet=True)  # "interrupted" after one run
    assert first == {"done": 1, "kept": 0, "failed": 0}
    done = [p for p in (tmp_path / "runs").iterdir() if is_finished(p)]
    assert len(done) == 1
    stamp = (done[0] / SUMMARY).stat().st_mtime_ns

    second = bench.run_grid(str(SMOKE), str(tmp_path), quiet=True)
    assert second == {"done": 2, "kept": 1, "failed": 0}
    assert (done[0] / SUMMARY).stat().st_mtime_ns == stamp  # not redone

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 3 * 3  # 3 runs (fedavg, fusion, centralised) x rounds 0..2
    assert {r["strategy"] for r in rows} == {"fedavg", "fusion", "centralised"}
    assert [r["round"] for r in rows if r["strategy"] == "fusion"] == ["0", "1", "2"]
    assert (tmp_path / "simple-cnn-e2-dir0.5.png").stat().st_size > 10_000

    finals = _report_finals((tmp_path / "report.md").read_text())
    last = {(r["setting"], r["strategy"]): float(r["accuracy"]) for r in rows if r["round"] == "2"}
    trained = {key: np.mean([float(r["accuracy"]) for r in rows if (r["setting"], r["strategy"]) == key
                             and r["round"] != "0"]) for key in last}
    assert finals.keys() == last.keys()
    for key, value in last.items():  # one seed: the means are the run's last accuracy, and rounds 1-2's mean
        assert finals[key] == pytest.approx((value, trained[key]), abs=1e-4)
    assert all(value > 0.6 for value in last.values())
    report = (tmp_path / "report.md").read_text()
    rows_shown = [line for line in report.splitlines() if line.startswith("| simple-cnn")]
    # The main table (3), against FedAvg (1), and fusion against the best rival in rounds 1-2 (2 rounds: few).
    assert len(rows_shown) == 3 + 1 + 2 and not any("±" in line for line in rows_shown)  # one seed: no spread shown
    assert len([line for line in rows_shown if "| fusion | 1 | 1 | fedavg |" in line]) == 1
    delta = re.search(r"\| simple-cnn-e2-dir0.5 \| fusion \| 1 \| ([+-][0-9.]+) \|", report)
    fedavg_final, fusion_final = (last[("simple-cnn-e2-dir0.5", s)] for s in ("fedavg", "fusion"))
    assert float(delta.group(1)) == pytest.approx(100 * (fusion_final - fedavg_final), abs=0.01)


def test_fusion_target_beats_the_average_after_a_skewed_round_and_bad_input_stops_it(tmp_path, capsys):
    from simulations.cli import main

    out = tmp_path / "target"
    args = ["lab", "fusion-target", "--dataset", "mnist-5k", "--clients", "5", "--alpha", "0.1", "--rounds", "2",
            "--local-epochs", "5", "--lr", "0.05", "--out", str(out)]
    assert main(args) == 0
    rows = json.loads((out / "fusion_target.json").read_text())["rounds"]
    assert [row["round"] for row in rows] == [1, 2]
    # Five clients that each saw a few classes for 5 epochs: their average is poor, and the
    # class-weighted logits (each class from the clients that hold it) beat both it and
    # the plain output ensemble.
    first = rows[0]
    assert first["fusion_target"] > first["average"] + 0.2 and first["fusion_target"] > first["ensemble"] + 0.05
    # The fused model of the same updates follows its target, not the average.
    assert first["fused_agrees"] > 0.85 and first["fused"] > first["average"] + 0.2
    assert main(args[:-2] + ["--alpha", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--alpha must be > 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(args[:-2] + ["--proxy-size", "5000", "--out", str(tmp_path / "big")]) == 2
    assert "--proxy-size 5000 must be between 0 and" in capsys.readouterr().err and not (tmp_path / "big").exists()
