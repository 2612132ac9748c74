"""FedDF: a Flower strategy that distills the clients' ensemble into FedAvg's weighted
average on the server's unlabeled proxy set (strategies.distillation), fusion's nearest
rival: both merge the clients' models on the server with unlabeled data. Reply
validation, sampling and records as for every strategy; the check against the average
(strategies.checked_merge) is off by default, as in the paper, and can be turned on to
compare FedDF with fusion like for like."""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import Message
from flwr.common.logger import log
from torch import nn

import models
from strategies import distillation
from strategies.checked_merge import CheckedMerge
from strategies.messages import array_record
from strategies.recording import RoundRecord


class FedDF(CheckedMerge):
    """Each round: validate the replies, average them (the student's start), distill the
    clients' averaged logits into it on four fifths of `proxy`, keep the checkpoint that
    agrees best with the ensemble on the other fifth (the average itself if none beats
    it), and, with a check, send the better of distilled and averaged."""

    merged = "distilled"

    def __init__(self, template: nn.Module, proxy: torch.Tensor, seed: int = 0, check: str = "off",
                 check_samples: int = 500, steps: int = distillation.STEPS, lr: float = distillation.LR,
                 temperature: float = distillation.TEMPERATURE, device: str = "cpu", **flower_kwargs):
        super().__init__(template, proxy, seed, check, check_samples, device=device, **flower_kwargs)
        self.steps, self.lr, self.temperature = steps, lr, temperature

    def aggregate_valid(self, server_round: int, valid: list[Message], record: RoundRecord):
        contents = [msg.content for msg in valid]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if len(valid) < 2:
            # An ensemble of one is the model itself: it becomes the global model.
            log(WARNING, "round %d: FedDF needs two valid updates, got one: it becomes the global model", server_round)
            record.extra.update(distill_s=0.0, selected="average")
            return contents[0]["arrays"], metrics
        client_models, averaged = self.clients_and_average(contents)
        x_fit, x_held = distillation.split_proxy(self.proxy, self.seed)
        distilled, report = distillation.distill(
            averaged, x_fit, distillation.ensemble_logits(client_models, x_fit), x_held,
            distillation.ensemble_logits(client_models, x_held), steps=self.steps, lr=self.lr,
            temperature=self.temperature, seed=self.seed + server_round, device=self.device)
        candidates = {self.merged: distilled, "average": averaged}
        selected, figures = self.choose(server_round, valid, client_models, candidates, x_held, record)
        record.extra.update(distill_s=report.seconds, server_device=str(self.device), distill_steps=report.steps,
                            distill_best_step=report.best_step, distill_agreement_start=report.agreement_start,
                            distill_agreement_best=report.agreement_best, selected=selected, **figures)
        return array_record(models.exchanged_state(candidates[selected])), metrics
