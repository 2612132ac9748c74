"""NeuronFusion: a Flower strategy that merges the clients' models by neuron-centric
fusion (strategies.fusion.fuse) on the server's unlabeled proxy set, in place of
FedAvg's weighted average. Sampling, reply validation and round records are fedfuse's
common discipline (RecordedRounds); FedAvg supplies configure_train."""

from __future__ import annotations

import copy
import math
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg
from torch import nn

import models
from strategies.fusion import fuse
from strategies.recording import RecordedRounds, RoundRecord
from strategies.validation import reply_problem


class NeuronFusion(RecordedRounds, FedAvg):
    """Each round: validate the replies (model, per-level attributions, class counts),
    load each client's model into the architecture of `template`, fuse them on `proxy`
    (a tensor of model inputs, no labels), and send the fused model out next round.

    `attribution`: "uniform" (clients send no scores: plain neuron-centric fusion, the
    ablation) or the captum method the clients use. `num_classes`: when set, clients
    send their class histogram and the head's target weighs each model's logit of a
    class by its share of that class's samples."""

    def __init__(self, template: nn.Module, proxy: torch.Tensor, attribution: str = "gradxact",
                 num_classes: int | None = None, seed: int = 0, **flower_kwargs):
        super().__init__(**flower_kwargs)
        self.template = copy.deepcopy(template).cpu().eval()
        self.proxy = proxy
        self.attribution = attribution
        self.num_classes = num_classes
        self.level_widths = {level.name: level.width for level in models.levels(self.template)}
        self.seed = seed

    def reply_problem(self, content) -> str | None:
        return reply_problem(content, self._expected,
                             attribution_widths=None if self.attribution == "uniform" else self.level_widths,
                             num_classes=self.num_classes)

    def aggregate_valid(self, server_round: int, valid: list[Message], record: RoundRecord):
        contents = [msg.content for msg in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        record.extra["clients_used"] = len(valid)
        if len(valid) < 2:
            # Nothing to fuse: the one valid model (as FedAvg would give) becomes global.
            log(WARNING, "round %d: fusion needs two valid updates, got one: it becomes the global model", server_round)
            record.extra["fusion_s"] = 0.0
            return contents[0]["arrays"], metrics
        client_models = []
        for content in contents:
            model = copy.deepcopy(self.template)
            models.load_exchanged_state(model, {k: v.numpy() for k, v in content["arrays"].items()})
            client_models.append(model)
        attributions = None if self.attribution == "uniform" else [
            [torch.from_numpy(content["attributions"][name].numpy()) for name in self.level_widths]
            for content in contents
        ]
        class_weights = None if self.num_classes is None else torch.tensor(
            [content["class-counts"]["counts"] for content in contents], dtype=torch.float64)
        # Every client started from the global model: its neurons correspond, no k-means++ restarts.
        fused, report = fuse(client_models, [self.proxy], attributions, class_weights=class_weights,
                             restarts=False, seed=self.seed + server_round)
        levels = report["levels"]
        moved = [lv["moved"] for lv in levels if lv["kind"] != "head" and not math.isnan(lv["moved"])]
        record.extra.update(
            fusion_s=report["seconds"],
            fit_loss_before=[lv["loss_before"] for lv in levels],
            fit_loss_after=[lv["loss_after"] for lv in levels],
            assignment_moved=float(np.mean(moved)) if moved else float("nan"),
            levels_reverted=sum("reverted" in lv["fit"] for lv in levels),
        )
        state = models.exchanged_state(fused)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}), metrics
