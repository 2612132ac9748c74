"""A benchmark grid from a TOML file: strategies x partitions x local epochs x models x
seeds, every run on the same partition for the same seed, plus the centralised
reference per (model, local epochs, seed).

    strategies = ["fedavg", "fedprox", "fusion", "fusion-uniform"]
    seeds = [0, 1, 2]
    local_epochs = [1, 5]
    target_accuracy = 0.75           # for "rounds / bytes to reach"
    [base]                           # run settings shared by every run (`fedfuse run` flag names)
    dataset = "fashion-mnist"
    clients = 10
    rounds = 10
    [[partitions]]
    partition = "dirichlet"
    alpha = 0.1
    [[models]]
    model = "simple-cnn"

Every field is checked, and every run's settings validated, before the first run starts."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from clients.task import TrainTask
from data import FederationSpec
from server.settings import RunSettings, SettingsError
from simulations.centralised import CENTRALISED

# Strategy labels of a grid: a Flower strategy plus the settings that make the variant.
_PLAIN = {"fusion_train_from": "global", "fusion_refine_steps": 0, "fusion_blends": 1, "fusion_head_target": "logits"}
STRATEGY_VARIANTS = {
    "fedavg": {"strategy": "fedavg"},
    "fedprox": {"strategy": "fedprox"},
    # fusion's defaults: clients on FedAvg's trajectory, the fused model refined, and 3 blends
    # of it and the average offered to the clients' check.
    "fusion": {"strategy": "fusion"},
    "fusion-uniform": {"strategy": "fusion", "attribution": "uniform"},
    # The default policy with the first head target (the class-weighted mean of centred logits).
    "fusion-logits": {"strategy": "fusion", "fusion_head_target": "logits"},
    # The first policy: clients train from what went out, the first head target, the fitted
    # model unrefined, no blends.
    "fusion-plain": {"strategy": "fusion", **_PLAIN},
    "fusion-plain-uniform": {"strategy": "fusion", "attribution": "uniform", **_PLAIN},
    "fusion-then-fedavg": {"strategy": "fusion", "fusion_rounds": 1, **_PLAIN},  # fusion's head start, then FedAvg
    # Clients on FedAvg's trajectory; the fused model goes out where the check prefers it.
    "fusion-from-average": {"strategy": "fusion", **_PLAIN, "fusion_train_from": "average"},
    # ... with the fused model refined, and 3 blends of it and the average for the check: the defaults.
    "fusion-blended": {"strategy": "fusion", "fusion_train_from": "average", "fusion_refine_steps": 2000,
                       "fusion_blends": 4},
    "fedavgm": {"strategy": "fedavgm", "server_momentum": 0.9},  # the usual choice (Hsu et al., arXiv 1909.06335)
    "fedadam": {"strategy": "fedadam"},
    "fedyogi": {"strategy": "fedyogi"},
    "krum": {"strategy": "krum", "malicious_clients": 2},  # tolerates the Byzantine grid's 2 attackers of 10
    "fedmedian": {"strategy": "fedmedian"},
    "fedtrimmedavg": {"strategy": "fedtrimmedavg"},  # beta 0.2: 2 of 10 values cut at each end
    "feddf": {"strategy": "feddf"},  # the paper's recipe, no check against the average
    "feddf-checked": {"strategy": "feddf", "distill_check": "clients"},  # fusion's check, like for like
}
_GRID_KEYS = {"strategies", "seeds", "local_epochs", "target_accuracy", "base", "partitions", "models"}
_PER_RUN_KEYS = {"strategy", "seed", "local_epochs", "out"}  # set by the grid itself


@dataclass(frozen=True)
class GridRun:
    run_id: str  # also the run's folder name under DIR/runs
    setting: str  # what a report groups seeds by: model, split, local epochs
    strategy: str  # a STRATEGY_VARIANTS label, or "centralised"
    seed: int
    settings: RunSettings


@dataclass(frozen=True)
class Grid:
    runs: list[GridRun]
    target_accuracy: float
    source: str


def _normalise(table: dict, where: str) -> dict:
    """A table of run settings (kebab- or snake-case keys) -> snake-case keys, checked
    against the declared settings (names and types) as every other door is."""
    values = {key.replace("-", "_"): value for key, value in table.items()}
    per_run = sorted(_PER_RUN_KEYS & set(values))
    if per_run:
        raise SettingsError(f"{where}: '{per_run[0]}' is set by the grid: use the top-level lists")
    try:
        RunSettings.from_mapping(values)
    except SettingsError as err:
        raise SettingsError(f"{where}: {err}") from None
    return values


def split_label(spec: FederationSpec) -> str:
    if spec.partition == "dirichlet":
        return f"dir{spec.alpha:g}"
    if spec.partition == "pathological":
        return f"C{spec.classes_per_client}"
    return spec.partition


def attack_label(task: TrainTask) -> str:
    """A Byzantine setting's part of the label: "-sign-flip-x2" for 2 sign-flip attackers."""
    return f"-{task.attack}-x{task.attackers}" if task.attackers else ""


def _list(config: dict, key: str, kind: type, default=None) -> list:
    value = config.get(key, default)
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                            for v in value):
        raise SettingsError(f"'{key}' must be a non-empty list of {kind.__name__}, got {value!r}")
    return value


def _model_slice(table: dict, where: str, strategies: list[str], epochs: list[int]) -> tuple[dict, tuple]:
    """A [[models]] table may narrow the grid for its model (a slice a slow model can
    finish): its own `strategies` and `local_epochs` lists, and `splits`, the split
    labels it runs ("dir0.1", "C2"). Returns the table without them, and the slice."""
    table = dict(table)
    own = {key: table.pop(key) for key in ("strategies", "local_epochs", "splits") if key in table}
    for key, kind in (("strategies", str), ("local_epochs", int), ("splits", str)):
        if key in own:
            _list(own, key, kind)
    _check_subset(own.get("strategies", []), strategies, where)
    return table, (own.get("strategies", strategies), own.get("local_epochs", epochs), own.get("splits"))


def _check_subset(own: list[str], strategies: list[str], where: str) -> None:
    unknown = sorted(set(own) - set(strategies))
    if unknown:
        raise SettingsError(f"{where}: strategies {unknown} are not in the grid's 'strategies'")


def _partition_slice(table: dict, where: str, strategies: list[str]) -> tuple[dict, list[str]]:
    """A [[partitions]] table may run only some of the grid's strategies (`strategies`):
    e.g. an attack on a claim that the others ignore, whose runs would repeat the clean
    ones. Returns the table without the list, and the strategies it runs."""
    table = dict(table)
    if "strategies" not in table:
        return table, strategies
    own = _list(table, "strategies", str)
    _check_subset(own, strategies, where)
    del table["strategies"]
    return table, own


def budget_label(values: dict) -> str:
    """The model and the clients' budget a round: e{local epochs}, or k{steps} where a
    fixed number of local steps replaces the epochs."""
    model = values.get("model", TrainTask.model).replace(":", "_")
    steps = values.get("local_steps", TrainTask.local_steps)
    return f"{model}-k{steps}" if steps else f"{model}-e{values['local_epochs']}"


def load_grid(path: str | Path, out_dir: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"no grid file {path}: give a TOML file such as simulations/configs/smoke.toml")
    try:
        config = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"{path} is not valid TOML: {err}") from None
    unknown = set(config) - _GRID_KEYS
    if unknown:
        raise SettingsError(f"{path}: unknown key(s) {sorted(unknown)}; known: {sorted(_GRID_KEYS)}")
    strategies = _list(config, "strategies", str)
    for name in strategies:
        if name not in STRATEGY_VARIANTS:
            raise SettingsError(f"{path}: unknown strategy '{name}': choose from {', '.join(STRATEGY_VARIANTS)}")
    seeds = _list(config, "seeds", int, [0])
    epochs = _list(config, "local_epochs", int, [1])
    target = config.get("target_accuracy", 0.7)
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise SettingsError(f"{path}: target_accuracy must be a fraction in (0, 1], got {target!r}")
    if not isinstance(config.get("base", {}), dict):
        raise SettingsError(f"{path}: [base] must be a table of run settings")
    base = _normalise(config.get("base", {}), f"{path} [base]")
    partitions = config.get("partitions", [{"partition": "dirichlet", "alpha": 0.5}])
    model_list = config.get("models", [{"model": "simple-cnn"}])
    for key, tables in (("partitions", partitions), ("models", model_list)):
        if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
            raise SettingsError(f"{path}: [[{key}]] must be one or more tables")

    out_dir = Path(out_dir) / "runs"
    runs: list[GridRun] = []
    for m, model_table in enumerate(model_list):
        where = f"{path} [[models]] #{m + 1}"
        model_table, (model_strategies, model_epochs, model_splits) = _model_slice(model_table, where, strategies,
                                                                                   epochs)
        model_values = _normalise(model_table, where)
        for e in model_epochs:
            for seed in seeds:
                values = {**base, **model_values, "local_epochs": e, "seed": seed}
                label = budget_label(values)
                run_id = f"{label}-{CENTRALISED}-s{seed}"
                settings = RunSettings.from_mapping({**values, "out": str(out_dir / run_id)})
                runs.append(GridRun(run_id, f"{label}-union", CENTRALISED, seed, settings))
            splits_seen = set()
            for p, partition_table in enumerate(partitions):
                where_part = f"{path} [[partitions]] #{p + 1}"
                partition_table, part_strategies = _partition_slice(partition_table, where_part, strategies)
                part_values = _normalise(partition_table, where_part)
                split = split_label(RunSettings.from_mapping({**base, **model_values, **part_values}).federation)
                splits_seen.add(split)
                if model_splits is not None and split not in model_splits:
                    continue
                for strategy in [s for s in model_strategies if s in part_strategies]:
                    for seed in seeds:
                        values = {**base, **model_values, **part_values, **STRATEGY_VARIANTS[strategy],
                                  "local_epochs": e, "seed": seed}
                        probe = RunSettings.from_mapping(values)
                        setting = f"{label}-{split}{attack_label(probe.task)}"
                        run_id = f"{setting}-{strategy}-s{seed}"
                        runs.append(GridRun(run_id, setting, strategy, seed,
                                            RunSettings.from_mapping({**values, "out": str(out_dir / run_id)})))
            missing = sorted(set(model_splits or ()) - splits_seen)
            if missing:
                raise SettingsError(f"{where}: splits {missing} match no [[partitions]] table "
                                    f"(there are {sorted(splits_seen)})")
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise SettingsError(f"{path}: two grid entries give the same run (same model, split, epochs, strategy, seed)")
    for run in runs:
        try:
            run.settings.validate()
        except (ValueError, FileNotFoundError) as err:
            raise SettingsError(f"{path}: run {run.run_id}: {err}") from None
    return Grid(runs, float(target), str(path))
