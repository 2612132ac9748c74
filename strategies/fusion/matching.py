"""Matching one level: all models' neurons -> K attribution-weighted targets, assigned
to the fused level's channels."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning


@dataclass
class Matching:
    targets: torch.Tensor  # (n, K, ...) target activation of each fused channel
    cost: float  # mean squared distance of fused channels to their targets, relative to the targets' power
    moved: float  # fraction of fused channels whose target is not the cluster seeded from them
    init: str  # which k-means start won: "fused" or "k-means++"


def neuron_points(acts: torch.Tensor, coords: torch.Tensor) -> np.ndarray:
    """(n, C, ...) activations -> (C, D): each channel a point over the chosen
    (sample, position) coordinates."""
    flat = acts.transpose(0, 1).reshape(acts.shape[1], -1)
    return flat[:, coords.to(flat.device)].double().cpu().numpy()


def _normalised(scores: torch.Tensor) -> np.ndarray:
    """Non-negative weights with mean 1, so every model weighs the same in total."""
    w = scores.double().clamp_min(0).numpy()
    return w / w.mean() if w.sum() > 0 else np.ones_like(w)


def match_level(client_acts: list[torch.Tensor], scores: list[torch.Tensor], fused_acts: torch.Tensor,
                max_dim: int = 4096, seed: int = 0, fresh_start: bool = True,
                values: list[torch.Tensor] | None = None, fused_values: torch.Tensor | None = None,
                fixed_channels: bool = False) -> Matching:
    """Cluster all models' neurons (points: their activations) into the fused width by
    attribution-weighted k-means started from the fused model's neurons, and assign the
    clusters to the fused channels. `fresh_start` also tries k-means++ and keeps it when
    clearly better: only for levels free to take any function (plain trainable layers),
    since with frozen kernels or a skip connection a channel's meaning is fixed.
    A target is the weighted mean of its cluster's members' `values` (default: the
    activations clustered; e.g. their pre-activations, when those are what is fitted).

    `fixed_channels`: the level's channels are the same functions in every model (frozen
    kernels: only a per-channel scale and shift train), so channel c of every model is
    cluster c and the fused channel c takes it; no k-means, nothing moves."""
    width = fused_acts.shape[1]
    weights = np.concatenate([_normalised(s) for s in scores])
    values = client_acts if values is None else values
    fused_values = fused_acts if fused_values is None else fused_values
    if fixed_channels:
        labels = np.concatenate([np.arange(a.shape[1]) for a in client_acts])
        clusters, empty = _cluster_means(values, labels, weights, width, fused_values)
        assigned, moved, init = np.arange(width), 0.0, "identity"
    else:
        per_channel = fused_acts[:, 0].numel()  # samples x positions
        generator = torch.Generator().manual_seed(seed)
        coords = torch.randperm(per_channel, generator=generator)[:max_dim].sort().values
        points = np.concatenate([neuron_points(a, coords) for a in client_acts])
        current = neuron_points(fused_acts, coords)
        with warnings.catch_warnings():
            # Dead (all-zero) neurons are duplicate points: fewer distinct clusters is expected.
            warnings.simplefilter("ignore", ConvergenceWarning)
            km, init = KMeans(width, init=current, n_init=1, random_state=seed).fit(points, sample_weight=weights), "fused"
            if fresh_start:
                fresh = KMeans(width, init="k-means++", n_init=3, random_state=seed).fit(points, sample_weight=weights)
                if km.inertia_ > 1.05 * fresh.inertia_:  # the fused start unless clearly worse
                    km, init = fresh, "k-means++"
        clusters, empty = _cluster_means(values, km.labels_, weights, width, fused_values)
        centers = km.cluster_centers_
        # Squared distances (cluster, channel) by the expansion: the broadcast difference
        # needs width^2 x coordinates of memory (5 GB for EfficientNet's 1280-wide head conv).
        cost = np.maximum((centers**2).sum(1)[:, None] + (current**2).sum(1)[None, :] - 2 * centers @ current.T, 0)
        cost[empty.cpu().numpy()] = cost.max() + 1.0  # empty clusters go last
        rows, cols = linear_sum_assignment(cost)
        assigned = np.empty(width, dtype=np.int64)
        assigned[cols] = rows
        moved = float((assigned != np.arange(width)).mean()) if init == "fused" else float("nan")

    assigned = torch.from_numpy(assigned).to(clusters.device)
    targets = clusters[assigned].transpose(0, 1).float()
    # A channel left with an empty cluster (or one of zero weight) keeps its current output as target.
    keep = empty[assigned]
    if keep.any():
        targets[:, keep] = fused_values[:, keep]
    power = float((targets.double() ** 2).mean()) or 1.0
    return Matching(targets=targets, cost=float(((targets - fused_values).double() ** 2).mean()) / power,
                    moved=moved, init=init)


def _cluster_means(values: list[torch.Tensor], labels: np.ndarray, weights: np.ndarray, width: int,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets over every coordinate, (K, n, ...): the weighted mean of each cluster's
    members' values; and which clusters are empty."""
    sums = torch.zeros((width, *like.shape[:1], *like.shape[2:]), dtype=torch.float64, device=like.device)
    mass = torch.zeros(width, dtype=torch.float64, device=like.device)
    offset = 0
    for acts in values:
        c = acts.shape[1]
        members = torch.from_numpy(labels[offset:offset + c]).long().to(like.device)
        w = torch.from_numpy(weights[offset:offset + c]).to(like.device)
        sums.index_add_(0, members, acts.transpose(0, 1).double() * w.view(-1, *[1] * (acts.dim() - 1)))
        mass.index_add_(0, members, w)
        offset += c
    return sums / mass.clamp_min(1e-12).view(-1, *[1] * (sums.dim() - 1)), mass <= 0

