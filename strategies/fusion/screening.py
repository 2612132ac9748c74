"""Which clients fusion leaves out of a round: well-formed updates that look like attacks.

Validation refuses broken replies; a Byzantine client sends well-formed ones (clients.
attacks). Two tests, on what fusion already holds (the models, the unlabeled proxy, the
class histograms), flag a model:

- Its predictions disagree with the others', where it claims to know. For each model,
  the share of proxy samples on which its class is the one the other models' mean
  softmax predicts (leave-one-out ensemble agreement), and the same share counted only
  over the samples that ensemble assigns to the classes the model claims, each weighted
  by the claimed share of its class (claim agreement). A model is flagged when both are
  below `ratio` x the round's median. Label-flip models (Fashion-MNIST, 2 of 10, along
  FedAvg's trajectory, seeds 0-2, rounds 2-5) agreed at 0-23% of the median at Dirichlet
  0.5. Where shards are more skewed an honest model predicts little but its own classes,
  so plain agreement flags honest models too (at #C=2 four honest clients of ten agreed
  on nothing, round after round), and a label-flip that drags the whole federation
  down lowers the median below any bound (Dirichlet 0.1, seed 1: medians 0.07-0.20, the
  flippers at 0.00-0.02, an honest client at 0.00-0.05). Claim agreement tells them
  apart: an honest model predicts its own classes where the others see them, a flipped
  one predicts others. On those probes, at Dirichlet 0.1, the two tests together flagged
  24 of 30 flipper-rounds (plain agreement with a floor on its median, the screen's
  first rule: 8) and 10 honest client-rounds of 150 on clean runs (13); at Dirichlet
  0.5, 27 of 30 (28) and 3 (7). Without histograms only plain agreement runs, and it
  stands down in rounds whose median is low (`MIN_MEDIAN_AGREEMENT`). A screened round
  also offers the check the average with the models screened for disagreement alone put
  back (`NeuronFusion`).
- Its training moved its predictions away from the classes it claims to hold. Local SGD
  on a shard raises the model's predicted shares of the shard's classes: the alignment
  sum_c claimed_c log(predicted_c / predicted_by_start_c), over the proxy, was +0.40 or
  more for every honest model at Dirichlet 0.1 and +0.04 or more at 0.5 (once -0.26),
  while a sign-flipped update, which unlearns what the shard taught, scored -0.16
  to -4.65 in every round of both splits. (The update's cosine to the median update, the
  first test tried, caught sign-flips at Dirichlet 0.5 only: at 0.1 honest updates are
  near orthogonal, and the flipped ones scored positive.) Noise updates score about 0.

docs/method.md (`--fusion-screen`) gives the figures. At most `max_share` of the models
are screened (a majority must stay to be fused): those moving away from their claims
first, then the least agreeing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from strategies.fusion.claims import mean_shares, predicted_shares, proxy_probabilities

SCREEN_RATIO = 0.5  # the default: flag agreement below half the round's median
# Without class histograms, below this median agreement the models disagree too much for
# agreement to single one out: clean rounds at #C=2 had medians of 0.07-0.11 (four honest
# clients a round at 0.00, all screened, cost 20+ points), Dirichlet 0.1 0.12-0.23 in
# rounds 1-2; label-flip models were caught from medians of 0.27 (Dirichlet 0.5, round 1)
# and 0.36 (0.1, round 3).
MIN_MEDIAN_AGREEMENT = 0.25
MAX_SHARE = 0.5  # screen fewer than half the models
# Claim agreement needs this many samples' worth of claimed weight on the proxy: below it
# the others hardly see the classes a model claims, which says nothing against it.
MIN_CLAIMED_SAMPLES = 10.0


@dataclass
class Screening:
    screened: list[int]  # indices of the flagged models, in the order they were taken
    agreement: list[float]  # per model, its leave-one-out ensemble agreement on the proxy
    claim_agreement: list[float]  # per model, that agreement where it claims to know (nan: unknown)
    alignment: list[float]  # per model, how its training moved its predictions toward its claims (nan: unknown)
    # Models x classes, each model's mean softmax on the proxy (claims.predicted_shares, to
    # the bit), for the class weights to reuse; None when too few models were screened.
    shares: torch.Tensor | None = None


def _leave_one_out(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Models x samples: the class of the other models' mean softmax, and whether the
    model's own argmax is that class (`probabilities`: models x samples x classes)."""
    others = (probabilities.sum(0, keepdim=True) - probabilities).argmax(2)
    return others, probabilities.argmax(2) == others


def ensemble_agreements(probabilities: torch.Tensor) -> list[float]:
    """Per model, the share of proxy samples on which its argmax is the argmax of the
    other models' mean softmax (`probabilities`: models x samples x classes)."""
    return _leave_one_out(probabilities)[1].double().mean(1).tolist()


def claim_agreements(probabilities: torch.Tensor, class_counts: torch.Tensor,
                     min_claimed: float = MIN_CLAIMED_SAMPLES) -> list[float]:
    """Per model, `ensemble_agreements` counted over the samples the other models' mean
    softmax assigns to the classes the model claims (`class_counts`, models x classes),
    each sample weighted by the model's claimed share of that class; nan where that weight
    sums to less than `min_claimed` samples."""
    claimed = class_counts.double()
    claimed = claimed / claimed.sum(1, keepdim=True).clamp_min(1)
    others, agrees = _leave_one_out(probabilities)
    weights = claimed.gather(1, others)  # each sample's weight: the claimed share of the class the others see
    evidence = weights.sum(1)
    agreement = (weights * agrees).sum(1) / evidence.clamp_min(1e-12)
    return torch.where(evidence >= min_claimed, agreement, float("nan")).tolist()


def claim_alignments(shares: torch.Tensor, start_shares: torch.Tensor, class_counts: torch.Tensor) -> list[float]:
    """Per model, sum_c q_c log(p_c / p0_c): q its claimed class histogram (normalised), p
    its mean softmax on the proxy (`shares`, models x classes), p0 that of the model it
    trained from (`start_shares`). Positive when training raised the predicted shares of
    the classes it claims."""
    claimed = class_counts.double()
    claimed = claimed / claimed.sum(1, keepdim=True).clamp_min(1)
    return (claimed * (shares.clamp_min(1e-12) / start_shares.clamp_min(1e-12)).log()).sum(1).tolist()


def screen(models: list[nn.Module], proxy: torch.Tensor, start: nn.Module | None = None,
           class_counts: torch.Tensor | None = None, ratio: float = SCREEN_RATIO,
           max_share: float = MAX_SHARE) -> Screening:
    """Flag the models whose training moved their predictions away from their claimed
    classes (given `start`, the model the clients trained from, and their `class_counts`,
    models x classes), or whose ensemble agreement is below `ratio` x the round's median:
    with `class_counts`, when their claim agreement is too; without, when that median is
    at least MIN_MEDIAN_AGREEMENT. At most `max_share` of them, those moving away from
    their claims first, then the least agreeing."""
    if not 0 < ratio <= 1:
        raise ValueError(f"the screen ratio must be in (0, 1], got {ratio}")
    unknown = [float("nan")] * len(models)
    if len(models) < 3:  # two models: neither is the odd one out
        return Screening([], unknown, unknown, unknown)
    probabilities = proxy_probabilities(models, proxy)  # one pass of each model over the proxy serves both tests
    agreement = ensemble_agreements(probabilities)
    shares = mean_shares(probabilities)
    alignment = unknown if start is None or class_counts is None else \
        claim_alignments(shares, predicted_shares([start], proxy)[0], class_counts)
    median = float(np.median(agreement))
    if class_counts is None:
        claim_agreement = unknown
        bound = ratio * median if median >= MIN_MEDIAN_AGREEMENT else 0.0
        disagrees = [a < bound for a in agreement]
    else:
        claim_agreement = claim_agreements(probabilities, class_counts)
        known = [a for a in claim_agreement if a == a]
        claim_bound = ratio * float(np.median(known)) if known else 0.0
        disagrees = [a < ratio * median and c < claim_bound for a, c in zip(agreement, claim_agreement)]
    flagged = [i for i in range(len(models)) if disagrees[i] or alignment[i] < 0]
    # Unlearning its own claimed classes is the stronger evidence: honest models disagree
    # with the others when shards are skewed, but they learn what they hold.
    flagged.sort(key=lambda i: (not alignment[i] < 0, agreement[i]))
    most = int(np.ceil(len(models) * max_share)) - 1
    return Screening(flagged[:most], agreement, claim_agreement, alignment, shares)
