"""Run settings: the server's own settings beside the clients' task (which holds the
data spec), each declared once as a field (`data.settings.setting`). The `fedfuse run`
flags, a grid file's keys, `flwr run .`'s config and the clients' message all derive
from these fields, and `validate` checks a run in full before Ray starts."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

import data
import models
import strategies
from clients import runtime
from clients.attacks import ABSENT
from clients.task import FUSION, TrainTask
from data.settings import (
    Check,
    SettingsError,
    check_values,
    choices_of,
    declared,
    flag,
    from_flat,
    nested,
    number,
    setting,
    to_flat,
    whole,
)
from strategies.checked_merge import CHECKS as FUSION_CHECKS
from strategies.checked_merge import TRAIN_FROM
from strategies.fusion import HEAD_TARGETS
from strategies.fusion.claims import CLAIM_CAP, SIZE_CAP
from strategies.fusion.screening import SCREEN_RATIO
from strategies.registry import PROXY_STRATEGIES

MIN_FUSION_PROXY = 32
ADAPTIVE = ("fedadam", "fedyogi")
FEDDF = ("feddf",)
# Settings a resumed run may change: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("out", "resume", "ray_address", "ray_num_cpus", "ray_num_gpus", "client_cpus", "client_gpus",
                     "server_device")


# Settings whose default follows other settings (RunSettings.from_mapping).
FOLLOWING = ("projection", "norm_stats", "fusion_blends")


@dataclass(frozen=True)
class RunSettings:
    """Everything one run needs: the clients' task (with the data spec) and the server's
    strategy, rounds, placement and run directory."""

    task: TrainTask = nested(TrainTask)
    strategy: str = setting("fedavg", "aggregation: Flower's fedavg, fedprox, fedavgm, fedadam, fedyogi, krum, "
                                      "fedmedian, fedtrimmedavg; feddf (ensemble distillation) or fusion "
                                      "(neuron-centric fusion)",
                            choices=lambda: strategies.names())
    rounds: int = setting(10, "federated rounds", check=whole(1))
    fraction: float = setting(1.0, "share of clients sampled per round", check=number(0, 1, low_open=True))
    min_clients: int = setting(1, "sample at least this many clients per round", check=whole(1))
    proximal_mu: float = setting(0.01, "FedProx's mu", check=number(0, phrase="must be >= 0"), strategies=("fedprox",))
    fusion_check: str = setting("clients", "which model goes out, fused or averaged: the more accurate on the clients' "
                                           "data (clients), the one agreeing better with their ensemble on held-out "
                                           "proxy samples (proxy), or always the fused one (off)",
                                choices=FUSION_CHECKS, strategies=FUSION)
    check_samples: int = setting(500, "fusion check: examples per client", check=whole(1), strategies=FUSION)
    fusion_rounds: int = setting(0, "fuse in the first N rounds only, then average as FedAvg does (0: every round)",
                                 check=whole(0, "must be a whole number >= 0 (0: fuse every round)"),
                                 strategies=FUSION)
    # The default policy (the grid label fusion-blended; fusion-plain is the first one): clients on
    # FedAvg's trajectory, the fused model refined, 3 blends with the average for the check. On
    # the headline's small-CNN settings it never ended below FedAvg; plain fusion did at high skew.
    fusion_refine_steps: int = setting(2000, "after the level-by-level fit, train the whole fused model to its target "
                                             "on the proxy for at most this many steps (0: no refinement)",
                                       check=whole(0, "must be a whole number >= 0 (0: no refinement)"),
                                       strategies=FUSION)
    fusion_head_target: str = setting(
        "log-probs", "what the fused head fits: the class-weighted mean of the clients' log-probabilities (log-probs, "
                     "a product of experts) or of their per-sample centred logits (logits, the first target)",
        choices=HEAD_TARGETS, strategies=FUSION)
    fusion_train_from: str = setting("average", "what clients train from next round: FedAvg's average of the "
                                                "round's updates (average: FedAvg's trajectory, the fused model goes "
                                                "out where the check prefers it) or the model that went out (global)",
                                     choices=TRAIN_FROM, strategies=FUSION)
    fusion_blends: int = setting(4, "with --fusion-check clients, also offer the check N - 1 blends of the average "
                                    "and the fused model, average + i/N (fused - average) (1: none; 2: the midpoint; "
                                    "default: 4 with the clients' check, else 1)",
                                 check=whole(1), strategies=FUSION)
    fusion_claim_cap: float = setting(
        CLAIM_CAP, "believe a client's class histogram only where each claimed share is at most this many times its "
             "model's predicted share on the proxy (else its predictions weigh the head; 0: believe every client)",
        check=Check(lambda v: v == 0 or v >= 1, "must be 0 (off) or at least 1"), strategies=FUSION)
    fusion_size_cap: float = setting(
        SIZE_CAP, "cap each client's claimed example count at this many times the round's median claim, for the "
                  "average and the class histograms (0: believe every count)",
        check=Check(lambda v: v == 0 or v >= 1, "must be 0 (off) or at least 1"), strategies=FUSION)
    fusion_screen: float = setting(
        SCREEN_RATIO, "leave out of a round's fusion and average the models whose predictions on the proxy agree with "
                      "the others' less than this share of the round's median, both overall and where they claim "
                      "to know (without class histograms: overall, when that median is at least 0.25), or whose "
                      "training lowered the predicted shares of the classes they claim (0: fuse every valid model)",
        check=Check(lambda v: 0 <= v <= 1, "must be 0 (off) or in (0, 1]"), strategies=FUSION)
    server_lr: float = setting(1.0, "FedAvgM's server learning rate",
                               check=number(0, low_open=True, phrase="must be a positive number"),
                               strategies=("fedavgm",))
    server_momentum: float = setting(0.0, "FedAvgM's server momentum (the library's default; 0.9 is the usual choice)",
                                     check=number(0, 1, high_open=True), strategies=("fedavgm",))
    eta: float = setting(0.0, "server learning rate of FedAdam and FedYogi (0: the library's own default, 0.1 "
                              "and 0.01)", check=number(0, phrase="must be >= 0"), strategies=ADAPTIVE)
    beta_1: float = setting(0.9, "first-moment decay of FedAdam and FedYogi", check=number(0, 1, high_open=True),
                            strategies=ADAPTIVE)
    beta_2: float = setting(0.99, "second-moment decay of FedAdam and FedYogi", check=number(0, 1, high_open=True),
                            strategies=ADAPTIVE)
    tau: float = setting(1e-3, "adaptivity of FedAdam and FedYogi (added to the second moment's root)",
                         check=number(0, low_open=True, phrase="must be a positive number"), strategies=ADAPTIVE)
    malicious_clients: int = setting(0, "Krum: how many malicious clients f it tolerates (it scores each update by "
                                        "its n - f - 2 nearest others)", check=whole(0), strategies=("krum",))
    trim_beta: float = setting(0.2, "FedTrimmedAvg: the share of values cut at each end, per coordinate",
                               check=number(0, 0.5, high_open=True), strategies=("fedtrimmedavg",))
    distill_steps: int = setting(10_000, "FedDF: at most this many distillation steps per round (Adam, batch 128, "
                                         "best of every 100 on held-out proxy samples, patience 1000)",
                                 check=whole(1), strategies=FEDDF)
    distill_lr: float = setting(1e-3, "FedDF: the distillation's Adam learning rate",
                                check=number(0, low_open=True, phrase="must be a positive number"), strategies=FEDDF)
    distill_temperature: float = setting(1.0, "FedDF: temperature of the KL to the clients' averaged logits",
                                         check=number(0, low_open=True, phrase="must be a positive number"),
                                         strategies=FEDDF)
    distill_check: str = setting("off", "FedDF: the check against the average, as --fusion-check (off: the paper's "
                                        "recipe)", choices=FUSION_CHECKS, strategies=FEDDF)
    full_finetune_rounds: int = setting(0, "after the projected rounds, fold the model and fine-tune every weight "
                                           "for K more rounds", check=whole(0))
    full_finetune_lr: float = setting(0.0, "learning rate after folding (0: --lr)",
                                      check=number(0, phrase="must be >= 0"))
    client_gpus: float = setting(0.0, "GPU share per client: 0.5 puts two clients on a GPU",
                                 check=Check(lambda v: 0 <= v <= 1 or (v > 0 and float(v).is_integer()),
                                             "must be a fraction of one GPU or a whole number"), flwr=False)
    server_device: str = setting("auto", "where the server merges the clients' models (fusion, FedDF): auto (CUDA "
                                         "when this process sees a GPU, else the CPU), cpu, cuda or cuda:N",
                                 strategies=PROXY_STRATEGIES)
    ray_address: str = setting("", "join a running Ray cluster ('auto' or HOST:PORT)", flwr=False)
    ray_num_cpus: int = setting(0, "CPUs of the local Ray instance (0: all)", check=whole(0), flwr=False)
    ray_num_gpus: float = setting(-1.0, "GPUs Ray declares locally (-1: detect; >= 0 declares logical GPUs)",
                                  flwr=False)
    out: str = setting("runs/latest", "run directory")
    resume: bool = setting(False, "continue the run in --out from its last complete round")

    @property
    def federation(self) -> data.FederationSpec:
        return self.task.federation

    @property
    def model(self) -> str:
        return self.task.model

    @property
    def total_rounds(self) -> int:
        return self.rounds + self.full_finetune_rounds

    @classmethod
    def from_mapping(cls, values, strict: bool = True) -> "RunSettings":
        """From flat settings (kebab- or snake-case keys: CLI flags, a grid file, Flower's
        run config). The settings of FOLLOWING take their default from others when not
        given: projection is on and BatchNorm statistics are frozen for pretrained
        backbones; fusion offers blends only to the clients' check."""
        settings = from_flat(cls, values, strict)
        names = {key.replace("-", "_") for key in values}
        pretrained = pretrained_backbone(settings.task.model, settings.task.pretrained)
        if "projection" not in names:
            settings = replace(settings, task=replace(settings.task, projection=pretrained))
        if "norm_stats" not in names:
            settings = replace(settings, task=replace(settings.task, norm_stats="frozen" if pretrained else "batch"))
        if "fusion_blends" not in names and settings.fusion_check != "clients":
            settings = replace(settings, fusion_blends=1)
        return settings

    def to_dict(self) -> dict:
        """Flat: the same names as the flags, the grid keys and the run config."""
        return to_flat(self)

    def strategy_options(self) -> dict:
        """The server's own settings, for the strategy builders (each takes what it uses);
        the server device resolved (`resolve_server_device`) for the strategies that merge."""
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}
        merges = self.strategy in PROXY_STRATEGIES
        return {**options, "server_device": str(resolve_server_device(self.server_device)) if merges else "cpu"}

    def train_task(self, full_finetune: bool = False) -> TrainTask:
        """The clients' task: fusion's inputs only for fusion; `full_finetune` is the phase
        after folding, where every weight trains."""
        task, fusion = self.task, self.strategy == "fusion"
        return replace(
            task, attribution=task.attribution if fusion else "", share_class_counts=task.share_class_counts and fusion,
            projection=task.projection and not full_finetune,
            lr=(self.full_finetune_lr or task.lr) if full_finetune else task.lr,
        )

    def validate(self) -> "data.ImageDataset":
        """Raise SettingsError (or DatasetError/ModelError/PartitionError, all
        ValueErrors) naming the problem; return the loaded dataset when all is well."""
        check_values(self)  # each setting's own rule
        task, spec = self.task, self.federation
        models.info(task.model)
        if self.full_finetune_rounds and not task.projection:
            raise SettingsError("--full-finetune-rounds continues a projected run: add --projection")
        if task.model == "simple-cnn" and task.resolution not in (0, 28):
            raise SettingsError("simple-cnn takes 28x28 input: drop --resolution")
        if task.weights and not Path(task.weights).is_file():
            raise SettingsError(f"--weights {task.weights} does not exist: give the path of a checkpoint file")
        if task.model.startswith("timm:") and task.pretrained and not task.weights:
            _check_timm_weights_reachable(task.model)
        for option, count in (("--poison-clients", task.poison_clients), ("--attackers", task.attackers)):
            if count > spec.clients:
                raise SettingsError(f"{option} must be a whole number from 0 to --clients ({spec.clients}), "
                                    f"got {count}")
        if task.attack == ABSENT and task.attackers >= spec.clients:
            raise SettingsError(f"--attack {ABSENT} with --attackers {task.attackers} leaves no client to train: "
                                f"give fewer attackers than --clients ({spec.clients})")
        if self.strategy == "fusion" and self.fusion_blends > 1 and self.fusion_check != "clients":
            raise SettingsError(f"--fusion-blends {self.fusion_blends} offers the clients' check more candidates: "
                                f"it needs --fusion-check clients, got {self.fusion_check}")
        if self.strategy == "krum" and self.malicious_clients and spec.clients <= 2 * self.malicious_clients + 2:
            raise SettingsError(f"--malicious-clients {self.malicious_clients}: Krum needs more than "
                                f"2 x {self.malicious_clients} + 2 clients, got --clients {spec.clients}")
        if self.strategy in PROXY_STRATEGIES:
            resolve_server_device(self.server_device)
        if self.client_gpus > 0 and self.ray_num_gpus == 0:
            raise SettingsError("--client-gpus > 0 but --ray-num-gpus 0 declares no GPU: raise one or the other")
        if spec.partition == "dirichlet" and not (spec.alpha > 0 and spec.alpha < float("inf")):
            raise SettingsError(f"--alpha must be > 0 (smaller is more skewed), got {spec.alpha}")
        dataset = data.load(spec.dataset, spec.data_root or None, spec.download)
        data.hold_out(dataset.train_labels, spec.proxy_size, spec.seed)  # checks the size only
        data.check_partition_args(
            spec.partition, len(dataset.train_labels) - spec.proxy_size, dataset.num_classes,
            spec.clients, spec.alpha, spec.classes_per_client,
        )
        if self.strategy in PROXY_STRATEGIES and spec.proxy_size < MIN_FUSION_PROXY:
            raise SettingsError(f"--strategy {self.strategy} merges the clients' models on the server's proxy set: "
                                f"--proxy-size must be at least {MIN_FUSION_PROXY}, got {spec.proxy_size}")
        if self.strategy == "fusion":
            try:
                models.levels(self.train_task().build_model(dataset.num_classes))
            except ValueError as err:
                raise SettingsError(f"--strategy fusion cannot cut --model {task.model} into levels: {err}") from None
        return dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, grouped by who uses it. Defaults are not set on the parser:
    only the flags given reach `RunSettings.from_mapping`, which fills in the rest."""
    titles = {data.FederationSpec: "data and partition", TrainTask: "clients: model and local training",
              RunSettings: "server: strategy, rounds, Ray, run directory"}
    groups = {owner: parser.add_argument_group(title) for owner, title in titles.items()}
    for name, f, owner in declared(RunSettings):
        kind = type(f.default)
        used_by = f.metadata["strategies"]
        shown = f"{f.default!r}" if kind is str else f"{f.default}"
        text = (f"[{', '.join(used_by)}] " if used_by else "") + f.metadata["help"]
        if "default" not in text:
            text += f" (default: {shown})"
        choices = choices_of(f)
        metavar = "{" + ",".join(choices) + "}" if choices else {int: "N", float: "X", str: "TEXT"}.get(kind)
        kwargs = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind, "metavar": metavar}
        groups[owner].add_argument(flag(name), dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"),
                                   **kwargs)


def flwr_run_config() -> dict:
    """The settings `flwr run .` takes in [tool.flwr.app.config], at their defaults
    (those of FOLLOWING are left out: without them, they follow other settings)."""
    return {name.replace("_", "-"): f.default for name, f, _ in declared(RunSettings)
            if f.metadata["flwr"] and name not in FOLLOWING}


def resolve_server_device(name: str) -> torch.device:
    """The torch device `--server-device` names: auto is the process's own device as a
    client picks it (cuda:0 when it sees CUDA, else the CPU). A CUDA device this process
    cannot see is an error."""
    if name == "auto":
        return runtime.pick_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SettingsError(f"--server-device {name!r}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= visible:
            raise SettingsError(f"--server-device {name}: this process sees {visible} CUDA device(s); "
                                f"use auto or cpu")
    return device


def pretrained_backbone(model: str, pretrained: bool) -> bool:
    """Whether the model is a pretrained backbone: projection and frozen BatchNorm
    statistics are then the defaults, both off for models trained from scratch."""
    return bool(pretrained and models.info(model).pretrained)


def _check_timm_weights_reachable(model: str) -> None:
    """Fail in a second, not after a minute of download retries, when pretrained timm
    weights are neither cached nor downloadable."""
    import socket

    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model.removeprefix("timm:"))
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    if repo and any(isinstance(try_to_load_from_cache(repo, f), str)
                    for f in ("model.safetensors", "pytorch_model.bin")):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise SettingsError(
            f"no cached pretrained weights for {model} and no network: pass --weights PATH "
            "or --no-pretrained"
        ) from None


if __name__ == "__main__":  # print pyproject's [tool.flwr.app.config] block from the declaration
    import json

    print("[tool.flwr.app.config]")
    for key, value in flwr_run_config().items():
        print(f"{key} = {json.dumps(value)}")
