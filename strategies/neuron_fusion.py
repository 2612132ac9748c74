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
from strategies.fusion import average_models, fuse
from strategies.recording import RecordedRounds, RoundRecord
from strategies.validation import reply_problem

SELECTION_SHARE = 5  # one proxy sample in five checks the fused model against the average


@torch.no_grad()
def ensemble_agreement(client_models: list[nn.Module], model: nn.Module, x: torch.Tensor) -> float:
    """Share of samples of x on which `model` predicts the class the clients' output
    ensemble (mean softmax) predicts. Not a KL divergence: the ensemble of non-IID
    clients is flat, and a KL would favour a flat, wrong model over a sharp, right one."""
    ensemble = torch.stack([m.eval()(x).softmax(1) for m in client_models]).mean(0).argmax(1)
    return float((model.eval()(x).argmax(1) == ensemble).double().mean())


class NeuronFusion(RecordedRounds, FedAvg):
    """Each round: validate the replies (model, per-level attributions, class counts),
    load each client's model into the architecture of `template`, fuse them on `proxy`
    (a tensor of model inputs, no labels), and send the fused model out next round.

    A fifth of the proxy set is kept out of the fit: on it the fused model must agree
    with the clients' output ensemble at least as well as FedAvg's weighted average, or
    the average is sent instead (the round's record says which).

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

    def _proxy_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, seeded fifth of the proxy set is kept out of the fit, for selection."""
        order = torch.randperm(len(self.proxy), generator=torch.Generator().manual_seed(self.seed))
        cut = len(self.proxy) // SELECTION_SHARE
        return self.proxy[order[cut:]], self.proxy[order[:cut]]

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
        fit_part, check_part = self._proxy_split()
        fused, report = fuse(client_models, [fit_part], attributions, class_weights=class_weights,
                             restarts=False, seed=self.seed + server_round)
        # Server-side model selection on proxy samples the fit never saw: the fused model
        # goes out unless FedAvg's average agrees better with the clients' output ensemble.
        averaged = average_models(client_models, [c["metrics"]["num-examples"] for c in contents])
        agreement = {name: ensemble_agreement(client_models, model, check_part)
                     for name, model in (("fusion", fused), ("average", averaged))}
        selected = "fusion" if agreement["fusion"] >= agreement["average"] else "average"
        if selected == "average":
            log(WARNING, "round %d: the weighted average agrees better with the clients' ensemble on held-out "
                "proxy samples (%.3f vs %.3f for fusion): it becomes the global model",
                server_round, agreement["average"], agreement["fusion"])
        levels = report["levels"]
        moved = [lv["moved"] for lv in levels if lv["kind"] != "head" and not math.isnan(lv["moved"])]
        record.extra.update(
            fusion_s=report["seconds"],
            fit_loss_before=[lv["loss_before"] for lv in levels],
            fit_loss_after=[lv["loss_after"] for lv in levels],
            assignment_moved=float(np.mean(moved)) if moved else float("nan"),
            levels_reverted=sum("reverted" in lv["fit"] for lv in levels),
            agreement_fusion=agreement["fusion"],
            agreement_average=agreement["average"],
            selected=selected,
        )
        state = models.exchanged_state(fused if selected == "fusion" else averaged)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()}), metrics
