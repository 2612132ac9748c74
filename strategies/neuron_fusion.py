"""NeuronFusion: a Flower strategy that merges the clients' models by neuron-centric
fusion (strategies.fusion.fuse) on the server's unlabeled proxy set, in place of
FedAvg's weighted average, and checks the fused model against that average before it
goes out (strategies.checked_merge). Sampling, reply validation and round records are
fedfuse's common discipline (RecordedRounds); FedAvg supplies configure_train."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from logging import WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from torch import nn

import models
from strategies.checked_merge import CheckedMerge
from strategies.fusion import average_models, fuse, restate_norm_statistics
from strategies.fusion.claims import CLAIM_CAP, SIZE_CAP, capped_sizes, checked_class_counts, predicted_shares
from strategies.fusion.screening import SCREEN_RATIO, screen
from strategies.messages import array_record
from strategies.recording import RoundRecord
from strategies.validation import reply_problem

# The check's candidate after a screened round: the average with the models screened for
# disagreement alone put back (named "average*", it goes out unscaled, as an average).
RESCUED = "average-rescued"


@dataclass
class Kept:
    """What a round's screen leaves to fuse: the valid replies that stay, their contents
    and models, and their average; `rescued` is the average with the models screened for
    disagreement alone put back (None when none were), `shares` the kept models'
    predicted class shares on the proxy (None when the screen did not compute them)."""

    replies: list[Message]
    contents: list
    client_models: list[nn.Module]
    averaged: nn.Module
    rescued: nn.Module | None = None
    shares: torch.Tensor | None = None


class NeuronFusion(CheckedMerge):
    """Each round: validate the replies (model, per-level attributions, class counts),
    load each client's model into the architecture of `template`, fuse them on `proxy`
    (a tensor of model inputs, no labels), check the fused model against FedAvg's
    weighted average of the same updates, and send the better one out next round (the
    round's record says which).

    `check`: "clients", "proxy" or "off", as strategies.checked_merge describes; note
    that "proxy" judges by the clients' ensemble, and once that ensemble falls below their
    average (small drift, from round 2 or 3 on) it keeps choosing the fused model.

    `attribution`: "uniform" (clients send no scores: plain neuron-centric fusion, the
    ablation) or the captum method the clients use. `num_classes`: when set, clients
    send their class histogram and the head's target weighs each model's logit of a
    class by its share of that class's samples; `claim_cap` > 0 first checks each
    histogram against the model's own predictions (strategies.fusion.claims; 0 believes
    the clients). `size_cap` > 0 caps each example count at that many times the round's
    median claim, for the average and the histograms (0: believed). `screen_ratio` > 0
    leaves out of a round's fusion and average the models whose predictions on the proxy
    agree with the others' less than that share of the round's median, or whose training
    lowered the predicted shares of the classes they claim (strategies.fusion.screening;
    0: fuse every valid model). `fusion_rounds`: when > 0, rounds after
    the first `fusion_rounds` send FedAvg's weighted average, unfused and unchecked, and
    ask the clients for neither attributions nor class histograms. `refine_steps`: the
    engine's end-to-end refinement of the fused model (0: none). `head_target`: what the
    fused head fits (`head_targets`: "log-probs" or "logits"). `train_from`: "global"
    (clients train from the model that went out) or "average" (from FedAvg's average of
    the round's updates: the clients follow FedAvg's trajectory, and the fused model is
    the global model in the rounds where the check prefers it). `blends`: with the
    clients' check, N > 1 also offers it N - 1 blends of the average and the fused model
    (`blends()`)."""

    merged = "fusion"

    def __init__(self, template: nn.Module, proxy: torch.Tensor, attribution: str = "gradxact",
                 num_classes: int | None = None, seed: int = 0, check: str = "clients", check_samples: int = 500,
                 fusion_rounds: int = 0, refine_steps: int = 0, train_from: str = "global", blends: int = 1,
                 claim_cap: float = CLAIM_CAP, size_cap: float = SIZE_CAP, screen_ratio: float = SCREEN_RATIO,
                 head_target: str = "log-probs", device: str = "cpu", **flower_kwargs):
        super().__init__(template, proxy, seed, check, check_samples, train_from, device, **flower_kwargs)
        self.attribution = attribution
        self.num_classes = num_classes
        self.level_widths = {level.name: level.width for level in models.levels(self.template)}
        self.fusion_rounds = fusion_rounds
        self.refine_steps = refine_steps
        self.head_target = head_target
        self.blends = blends
        self.claim_cap = claim_cap
        self.size_cap = size_cap
        if screen_ratio and not 0 < screen_ratio <= 1:
            raise ValueError(f"the screen ratio must be 0 (off) or in (0, 1], got {screen_ratio}")
        self.screen_ratio = screen_ratio
        self._fusing = True  # whether this round's replies are fused (set per round)

    def fuses(self, server_round: int) -> bool:
        return not self.fusion_rounds or server_round <= self.fusion_rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self._fusing = self.fuses(server_round + self.round_offset)
        if not self._fusing:
            # The server will only average: clients are spared the attribution pass.
            config = ConfigRecord({**dict(config), "attribution": "", "share-class-counts": False})
        return super().configure_train(server_round, arrays, config, grid)

    def reply_problem(self, content) -> str | None:
        scored = self._fusing and self.attribution != "uniform"
        return reply_problem(content, self._expected, attribution_widths=self.level_widths if scored else None,
                             num_classes=self.num_classes if self._fusing else None)

    def example_weights(self, contents: list) -> list[float]:
        claimed = super().example_weights(contents)
        return capped_sizes(claimed, self.size_cap) if self.size_cap else claimed

    def aggregate_valid(self, server_round: int, valid: list[Message], record: RoundRecord):
        contents = [msg.content for msg in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        record.extra["clients_used"] = len(valid)
        self.next_training_start(None)
        if len(valid) < 2:
            # Nothing to fuse: the one valid model (as FedAvg would give) becomes global.
            log(WARNING, "round %d: fusion needs two valid updates, got one: it becomes the global model", server_round)
            record.extra["fusion_s"] = 0.0
            return contents[0]["arrays"], metrics
        client_models, averaged = self.clients_and_average(contents)
        every_valid = valid
        fit_part, check_part = self._proxy_split()
        kept = Kept(valid, contents, client_models, averaged)
        if self.fuses(server_round) and self.screen_ratio:
            kept = self._screen(server_round, kept, fit_part, record)
        valid, contents, client_models, averaged, rescued = (
            kept.replies, kept.contents, kept.client_models, kept.averaged, kept.rescued)
        sizes = self.example_weights(contents)
        if self.size_cap:
            record.extra["sizes_capped"] = [self._partition(msg) for msg, size in zip(valid, sizes)
                                            if size < msg.content["metrics"]["num-examples"]]
        if not self.fuses(server_round):
            # Past its fusion rounds the server is FedAvg.
            record.extra.update(fusion_s=0.0, selected="average")
            return array_record(models.exchanged_state(averaged)), metrics
        attributions = None if self.attribution == "uniform" else [
            [torch.from_numpy(content["attributions"][name].numpy()) for name in self.level_widths]
            for content in contents
        ]
        class_weights = None if self.num_classes is None else self._class_weights(valid, sizes, client_models,
                                                                                    fit_part, record, kept.shares)
        # Every client started from the global model: its neurons correspond, no k-means++ restarts.
        fused, report = fuse(client_models, [fit_part], attributions, class_weights=class_weights,
                             restarts=False, refine_steps=self.refine_steps, head_target=self.head_target,
                             seed=self.seed + server_round, device=self.device)
        if self._task_config.get("norm-stats") == "frozen":  # the clients' statistics, which they never update
            restate_norm_statistics(fused, averaged)
        candidates = {"fusion": fused, "average": averaged, **blends(averaged, fused, self.blends)}
        if rescued is not None:
            # Clients screened for disagreement alone may be honest (non-IID models disagree
            # early on): the check also weighs the average with them put back, and asks every client.
            candidates[RESCUED] = rescued
        selected, figures = self.choose(server_round, every_valid, client_models, candidates, check_part, record)
        self.next_training_start(rescued if selected == RESCUED else averaged)
        levels = report["levels"]
        moved = [lv["moved"] for lv in levels if lv["kind"] != "head" and not math.isnan(lv["moved"])]
        record.extra.update(
            fusion_s=report["seconds"],
            server_device=str(self.device),
            fit_loss_before=[lv["loss_before"] for lv in levels],
            fit_loss_after=[lv["loss_after"] for lv in levels],
            assignment_moved=float(np.mean(moved)) if moved else float("nan"),
            levels_reverted=sum("reverted" in lv["fit"] for lv in levels),
            **_refine_figures(report.get("refine")),
            selected=selected,
            **figures,
        )
        return array_record(models.exchanged_state(candidates[selected])), metrics

    def _screen(self, server_round: int, every: Kept, proxy: torch.Tensor, record: RoundRecord) -> Kept:
        """Leave out of `every` (the round's valid replies) the models `screen` flags on
        `proxy` (strategies.fusion.screening). When some were screened for disagreement
        alone, the result's `rescued` is the average with those put back (the `RESCUED`
        candidate). A model whose training unlearnt the classes it claims is never put
        back: the average of every update would carry a sign-flip to the clients whenever
        it won the check. The round's record lists every partition's figures and the
        screened partitions."""
        valid, contents, client_models = every.replies, every.contents, every.client_models
        start = None if self._round_start is None else models.with_state(self.template, self._round_start)
        claimed = None if self.num_classes is None else torch.tensor(
            [content["class-counts"]["counts"] for content in contents], dtype=torch.float64)
        result = screen(client_models, proxy, start, claimed, self.screen_ratio)
        partitions = [str(self._partition(msg)) for msg in valid]
        record.extra.update(screened=[int(partitions[i]) for i in result.screened],
                            screen_agreement=dict(zip(partitions, np.round(result.agreement, 4).tolist())),
                            screen_claim_agreement=dict(zip(partitions, np.round(result.claim_agreement, 4).tolist())),
                            screen_alignment=dict(zip(partitions, np.round(result.alignment, 4).tolist())))
        if not result.screened:
            return replace(every, shares=result.shares)
        log(WARNING, "round %d: the models of partitions %s disagree with the others' predictions or unlearnt their "
            "own classes: they are left out of the fusion and the average", server_round, record.extra["screened"])

        def average_without(left_out) -> nn.Module:
            indices = [i for i in range(len(valid)) if i not in left_out]
            return average_models([client_models[i] for i in indices],
                                  self.example_weights([contents[i] for i in indices]))

        unlearnt = {i for i in result.screened if result.alignment[i] < 0}
        rescued = None
        if len(unlearnt) < len(result.screened):  # some were screened for disagreement alone
            # With none unlearnt that is every model's average, already made.
            rescued = every.averaged if not unlearnt else average_without(unlearnt)
        kept = [i for i in range(len(valid)) if i not in result.screened]
        return Kept([valid[i] for i in kept], [contents[i] for i in kept], [client_models[i] for i in kept],
                    average_without(result.screened), rescued, None if result.shares is None else result.shares[kept])

    def _class_weights(self, valid: list[Message], sizes: list[float], client_models: list[nn.Module],
                       proxy: torch.Tensor, record: RoundRecord, shares: torch.Tensor | None = None) -> torch.Tensor:
        """The clients' class histograms, scaled to their (capped) `sizes` and checked
        against their models' predicted shares on `proxy` (`shares` when the screen already
        computed them) when `claim_cap` is set; the round's record names the partitions
        whose histogram was not believed."""
        claimed = torch.tensor([msg.content["class-counts"]["counts"] for msg in valid], dtype=torch.float64)
        claimed *= torch.tensor(sizes, dtype=torch.float64)[:, None] / claimed.sum(1, keepdim=True).clamp_min(1)
        if not self.claim_cap:
            return claimed
        predicted = predicted_shares(client_models, proxy) if shares is None else shares
        checked = checked_class_counts(claimed, predicted, self.claim_cap)
        replaced = [self._partition(valid[i]) for i in checked.replaced]
        if replaced:
            log(WARNING, "round %d: class histograms of partitions %s disagree with their models' predictions: "
                "their predicted shares weigh the head instead", record.server_round, replaced)
        record.extra.update(claims_replaced=replaced, claims_capped_mass=max(checked.capped_mass))
        return checked.counts


def _refine_figures(refined: dict | None) -> dict:
    """The refinement's round figures: its steps, the step kept (0: the fitted model)
    and the held-out loss to the target before and after."""
    return {} if refined is None else {f"refine_{name}": value for name, value in refined.items()}


def blends(averaged: nn.Module, fused: nn.Module, count: int) -> dict[str, nn.Module]:
    """The `count` - 1 models average + i / count * (fused - average), i = 1 .. count - 1,
    named "blend-0.5" etc. Every client started from one global model and the fused model
    starts as their average, so the two lie in one basin: after round 2 of 20 local epochs
    at Dirichlet 0.1 their midpoint was 5 points above both."""
    return {f"blend-{i / count:g}": average_models([averaged, fused], [count - i, i]) for i in range(1, count)}
