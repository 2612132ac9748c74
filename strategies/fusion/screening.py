"""Which clients fusion leaves out of a round: well-formed updates that look like attacks.

Validation refuses broken replies; a Byzantine client sends well-formed ones (clients.
attacks). Two tests, in the terms fusion already works in, flag a model:

- Its predictions on the proxy disagree with the others'. For each model, the share of
  proxy samples on which its class is the one the other models' mean softmax predicts
  (leave-one-out ensemble agreement), against the round's median share. Label-flip
  models (Fashion-MNIST, 2 of 10, along FedAvg's trajectory, seeds 0-2, rounds 2-5) agreed
  at 0-23% of the median at Dirichlet 0.5, honest ones at 35% or more. At Dirichlet 0.1 an
  honest model predicts little but its own classes and fell as low as 0% in rounds 1-3,
  while one label-flip model of three seeds was never below the median: this test alone
  cannot tell them apart there, which is why a screened round also offers the check the
  average of every update (`NeuronFusion`).
- Its update points against the others'. The cosine of each update (model minus the
  model the client trained from) to the coordinate-wise median update: sign-flipped
  updates at Dirichlet 0.5 were at -0.41 to -0.68, honest ones at +0.25 or more (at
  Dirichlet 0.1 all were positive, honest ones +0.10 or more: none is flagged there).

docs/method.md (`--fusion-screen`) gives the figures. At most `max_share` of the models are screened, the least agreeing first: a majority
must stay to be fused."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

SCREEN_RATIO = 0.5  # the default: flag agreement below half the round's median
MAX_SHARE = 0.5  # screen fewer than half the models


@dataclass
class Screening:
    screened: list[int]  # indices of the flagged models, least agreeing first
    agreement: list[float]  # per model, its leave-one-out ensemble agreement on the proxy
    cosine: list[float]  # per model, its update's cosine to the median update (nan without a start)


@torch.no_grad()
def ensemble_agreements(models: list[nn.Module], proxy: torch.Tensor, batch_size: int = 256) -> list[float]:
    """Per model, the share of proxy samples on which its argmax is the argmax of the
    other models' mean softmax."""
    probs = []
    for model in models:
        mode = model.training
        model.eval()
        probs.append(torch.cat([model(proxy[i:i + batch_size]).double().softmax(1)
                                for i in range(0, len(proxy), batch_size)]))
        model.train(mode)
    probs = torch.stack(probs)
    total = probs.sum(0)
    return [float((p.argmax(1) == (total - p).argmax(1)).double().mean()) for p in probs]


@torch.no_grad()
def update_cosines(models: list[nn.Module], start: nn.Module) -> list[float]:
    """Per model, the cosine of its parameter update from `start` to the coordinate-wise
    median of all the models' updates."""
    origin = parameters_to_vector(start.parameters()).double()
    updates = torch.stack([parameters_to_vector(m.parameters()).double() - origin for m in models])
    median = updates.median(0).values
    norms = updates.norm(dim=1) * median.norm()
    return [float(u @ median / n) if n > 0 else 0.0 for u, n in zip(updates, norms)]


def screen(models: list[nn.Module], proxy: torch.Tensor, start: nn.Module | None, ratio: float = SCREEN_RATIO,
           max_share: float = MAX_SHARE) -> Screening:
    """Flag the models whose ensemble agreement is below `ratio` x the round's median, or
    whose update has a negative cosine to the median update (when `start`, the model the
    clients trained from, is known); at most `max_share` of them, the least agreeing first."""
    if not 0 < ratio <= 1:
        raise ValueError(f"the screen ratio must be in (0, 1], got {ratio}")
    if len(models) < 3:  # two models: neither is the odd one out
        return Screening([], [float("nan")] * len(models), [float("nan")] * len(models))
    agreement = ensemble_agreements(models, proxy)
    cosine = update_cosines(models, start) if start is not None else [float("nan")] * len(models)
    bound = ratio * float(np.median(agreement))
    flagged = [i for i in range(len(models)) if agreement[i] < bound or cosine[i] < 0]
    flagged.sort(key=lambda i: agreement[i])
    most = int(np.ceil(len(models) * max_share)) - 1
    return Screening(flagged[:most], agreement, cosine)
