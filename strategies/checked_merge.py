"""The server's check of a merged model (fused, distilled) against FedAvg's weighted
average of the same updates: the better of the two goes out next round. Shared by the
strategies that merge the clients' models on the server (NeuronFusion, FedDF).

`check` "clients" sends both candidates to the clients that sent the updates; each
reports their accuracy on `check_samples` of its own examples and their loss at a few
logit temperatures (one extra message per client: two models down, 26 numbers up;
labels stay with the clients). The more accurate candidate over the clients' shards
(each weighed by its size) goes out, the lower loss breaking ties; a merged model goes
out divided by the temperature that fits the clients' data best. "proxy" keeps a fifth
of the proxy set out of the merge and prefers the candidate that agrees better with the
clients' output ensemble there: no extra messages, but the ensemble is its reference.
"off" always sends the merged model."""

from __future__ import annotations

import copy
import math
import time
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg
from torch import nn

import models
from strategies.distillation import split_proxy
from strategies.fusion import average_models
from strategies.messages import array_record
from strategies.recording import RecordedRounds, RoundRecord

CHECKS = ("clients", "proxy", "off")
# What the clients train from next round: the model that went out (global), or FedAvg's
# average of the round's updates, whichever model went out (average).
TRAIN_FROM = ("global", "average")
CHECK_TIMEOUT = 3600.0
# Temperatures the clients try on each candidate's logits: the fused model goes out
# divided by the one with the lowest loss on their data (temperature scaling).
TEMPERATURES = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


@torch.no_grad()
def ensemble_agreement(client_models: list[nn.Module], model: nn.Module, x: torch.Tensor) -> float:
    """Share of samples of x on which `model` predicts the class the clients' output
    ensemble (mean softmax) predicts. Not a KL divergence: the ensemble of non-IID
    clients is flat, and a KL would favour a flat, wrong model over a sharp, right one."""
    ensemble = torch.stack([m.eval()(x).softmax(1) for m in client_models]).mean(0).argmax(1)
    return float((model.eval()(x).argmax(1) == ensemble).double().mean())


class CheckedMerge(RecordedRounds, FedAvg):
    """Base of the strategies that merge the clients' models on the server's unlabeled
    `proxy` (a tensor of model inputs) and check the merged model, named `merged` in the
    records, against the average (module docstring)."""

    merged = "merged"

    def __init__(self, template: nn.Module, proxy: torch.Tensor, seed: int = 0, check: str = "clients",
                 check_samples: int = 500, train_from: str = "global", device: str = "cpu", **flower_kwargs):
        super().__init__(**flower_kwargs)
        if check not in CHECKS:
            raise ValueError(f"unknown check '{check}': choose one of {', '.join(CHECKS)}")
        if train_from not in TRAIN_FROM:
            raise ValueError(f"unknown train-from '{train_from}': choose one of {', '.join(TRAIN_FROM)}")
        self.template = copy.deepcopy(template).cpu().eval()
        self.proxy = proxy
        self.seed = seed
        self.check, self.check_samples = check, check_samples
        self.train_from = train_from
        self.device = torch.device(device)  # where the merge runs; the check stays on the CPU
        self._grid, self._task_config = None, {}
        # train_from "average": the last merged round's average, which the clients train
        # from next instead of the global model that went out.
        self._train_start: dict[str, np.ndarray] | None = None
        self._round_start: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        # The check after the merge asks the same clients again, with the same task.
        self._grid, self._task_config = grid, dict(config)
        if self._train_start is not None:
            arrays = array_record(self._train_start)
        self._round_start = arrays  # what this round's updates are measured from
        return super().configure_train(server_round, arrays, config, grid)

    def next_training_start(self, averaged: nn.Module | None) -> None:
        """After a merge: with train_from "average", the clients' next round starts from
        `averaged` (None: from the global model, when the round only averaged)."""
        self._train_start = models.exchanged_state(averaged) if averaged is not None and \
            self.train_from == "average" else None

    def server_state(self) -> dict:
        return {} if self._train_start is None else {"train_start": self._train_start}

    def load_server_state(self, state: dict) -> None:
        self._train_start = state.get("train_start")

    def clients_and_average(self, contents: list) -> tuple[list[nn.Module], nn.Module]:
        """The valid replies' models, in partition order, and their example-weighted average."""
        client_models = [models.with_state(self.template, content["arrays"]) for content in contents]
        return client_models, average_models(client_models, self.example_weights(contents))

    def example_weights(self, contents: list) -> list[float]:
        """What the average weighs each reply by: its example count, as FedAvg does."""
        return [c["metrics"]["num-examples"] for c in contents]

    def _proxy_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Check "proxy": a fixed, seeded fifth of the proxy set is kept out of the merge."""
        if self.check != "proxy":
            return self.proxy, self.proxy[:0]
        return split_proxy(self.proxy, self.seed)

    def choose(self, server_round: int, valid: list[Message], client_models: list[nn.Module],
               candidates: dict[str, nn.Module], held_out: torch.Tensor, record: RoundRecord) -> tuple[str, dict]:
        """The name of the candidate that goes out (`merged`, "average", or with the
        clients' check any other of `candidates`) and the check's figures."""
        if self.check == "clients":
            return self._check_on_clients(server_round, valid, candidates, record)
        if self.check == "proxy":
            return _check_on_proxy(server_round, client_models, candidates, held_out, self.merged)
        return self.merged, {}

    def _check_on_clients(self, server_round: int, valid: list[Message], candidates: dict[str, nn.Module],
                          record: RoundRecord) -> tuple[str, dict]:
        """All candidates (the merged model, the average, and any others, such as blends of
        the two) go to the clients of the valid updates; each reports their accuracy and
        loss on a sample of its shard, and the most accurate goes out. Without a usable
        reply the average (FedAvg's choice) goes out."""
        started = time.perf_counter()
        arrays = {name: array_record(models.exchanged_state(model)) for name, model in candidates.items()}
        config = ConfigRecord({**self._task_config, "server-round": server_round, "check-samples": self.check_samples,
                               "check-temperatures": list(TEMPERATURES)})
        messages = [Message(RecordDict({**arrays, "config": config}), dst_node_id=msg.metadata.src_node_id,
                            message_type=MessageType.EVALUATE) for msg in valid]
        replies = self._grid.send_and_receive(messages, timeout=CHECK_TIMEOUT) if self._grid is not None else []
        record.bytes_down += sum(a.count_bytes() for a in arrays.values()) * len(messages)
        # Each client's sample stands for its whole shard: weighed by the shard's size, the
        # figures estimate accuracy over the union of the shards. (Weighed by the sample
        # sizes, small shards counted as much as large ones: at Dirichlet 0.1 that rated a
        # fused model 0.77 whose accuracy over the shards was 0.69, and 0.68 on the test set.)
        accuracy = {name: 0.0 for name in candidates}
        losses = {name: np.zeros(len(TEMPERATURES)) for name in candidates}
        examples, checked = 0, 0
        for reply in replies:
            problem = _check_reply_problem(reply, candidates)
            if problem is not None:
                log(WARNING, "round %d: model check: ignoring the reply of node %d: %s",
                    server_round, reply.metadata.src_node_id, problem)
                continue
            m = reply.content["metrics"]
            examples, checked = examples + m["num-examples"], checked + int(m["checked-examples"])
            for name in candidates:
                accuracy[name] += m["num-examples"] * m[f"{name}-accuracy"]
                losses[name] += m["num-examples"] * np.array(m[f"{name}-losses"], dtype=float)
        figures = {"check_s": time.perf_counter() - started, "check_examples": checked}
        if examples == 0:
            log(WARNING, "round %d: model check: no client reported, the weighted average goes out", server_round)
            return "average", figures
        # The fused model's head is fitted to the clients' logits, class by class, and can
        # be far more confident than it is right (#C=2: loss 4-7 at 25-43% accuracy, and
        # local SGD from it diverged to NaN in round 4): a merged model goes out
        # temperature-scaled, so it is judged at its best temperature.
        unscaled = TEMPERATURES.index(1.0)
        # The merged models first: they win ties. Averages (FedAvg's, and "average-rescued" when
        # fusion screened clients out) go out as they are, not temperature-scaled.
        merged = [name for name in candidates if not name.startswith("average")]
        averages = [name for name in candidates if name.startswith("average")]
        best = {name: int(np.argmin(losses[name])) for name in merged}
        figures.update(**{f"check_loss_{name}": losses[name][best[name]] / examples for name in merged},
                       **{f"check_accuracy_{name}": accuracy[name] / examples for name in candidates},
                       **{f"check_loss_{name}": losses[name][unscaled] / examples for name in averages})
        figures[f"check_loss_{self.merged}_unscaled"] = losses[self.merged][unscaled] / examples
        # Accuracy first: a fused model is often the more accurate but the less calibrated
        # (round 1 of EfficientNet-Lite0, Dirichlet 0.1: test accuracy 0.47 vs 0.15, loss
        # 3.1 vs 2.4), and accuracy is what the federation is after.
        score = {name: (figures[f"check_accuracy_{name}"], -figures[f"check_loss_{name}"]) for name in candidates}
        selected = max(merged + averages, key=lambda name: score[name])
        figures[f"{self.merged}_temperature"] = TEMPERATURES[best[self.merged if selected in averages else selected]]
        if selected in averages:
            log(WARNING, "round %d: on the clients' data the weighted average (%s) is the more accurate (%.4f vs %.4f "
                "for the merged model): it becomes the global model", server_round, selected,
                figures[f"check_accuracy_{selected}"], figures[f"check_accuracy_{self.merged}"])
        else:
            _scale_logits(candidates[selected], 1.0 / figures[f"{self.merged}_temperature"])
        return selected, figures


def _check_reply_problem(reply: Message, candidates: dict) -> str | None:
    if reply.has_error():
        return f"it failed: {reply.error.reason}"
    if "metrics" not in reply.content.metric_records:
        return "it has no metrics"
    m = reply.content["metrics"]
    keys = ["num-examples", "checked-examples"] + [f"{name}-accuracy" for name in candidates]
    if any(key not in m or not math.isfinite(float(m[key])) for key in keys) or m["checked-examples"] <= 0:
        return f"it needs finite {', '.join(keys)} and at least one example"
    for name in candidates:
        values = m.get(f"{name}-losses")
        if not isinstance(values, list) or len(values) != len(TEMPERATURES) or not np.isfinite(values).all():
            return f"{name}-losses must be {len(TEMPERATURES)} finite numbers, one per temperature"
    return None


@torch.no_grad()
def _scale_logits(model: nn.Module, factor: float) -> None:
    """Multiply the logits by `factor`: the head's trainable weights and bias (a linear
    head; of a projected one, its gamma and bias) scale with it."""
    head = models.levels(model)[-1]
    for p in head.probe.parameters():
        if p.requires_grad:
            p.mul_(factor)


def _check_on_proxy(server_round: int, client_models: list[nn.Module], candidates: dict[str, nn.Module],
                    held_out: torch.Tensor, merged: str) -> tuple[str, dict]:
    """The fused model goes out unless FedAvg's average agrees better with the clients'
    output ensemble on proxy samples the fit never saw."""
    agreement = {name: ensemble_agreement(client_models, model, held_out) for name, model in candidates.items()}
    selected = merged if agreement[merged] >= agreement["average"] else "average"
    if selected == "average":
        log(WARNING, "round %d: the weighted average agrees better with the clients' ensemble on held-out "
            "proxy samples (%.3f vs %.3f for the merged model): it becomes the global model",
            server_round, agreement["average"], agreement[merged])
    return selected, {f"agreement_{merged}": agreement[merged], "agreement_average": agreement["average"]}
