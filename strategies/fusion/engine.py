"""`fuse(models, proxy_loader, attributions=None)`: neuron-centric fusion of models of
one architecture, level by level, on unlabeled proxy data, optionally refined end to end
(`refine`). Plain PyTorch, no flwr."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import Level, ProjectedConv2d, ProjectedLinear, levels
from strategies.fusion.chains import Chain, conv_norm_chain, fit_chain, folded_norm, set_folded_norm
from strategies.fusion.fitting import closed_form_fit, early_stopped_adam, gradient_fit
from strategies.fusion.matching import Matching, match_level

_NORMS = nn.modules.batchnorm._BatchNorm


class FusionError(ValueError):
    """Inputs fusion cannot use; the message names the model and the level."""


@dataclass
class LevelReport:
    level: str
    kind: str
    width: int
    fit: str  # "closed", "gradient" or "none"
    matching_cost: float
    moved: float
    init: str
    loss_before: float
    loss_after: float
    seconds: float


def _proxy_inputs(proxy_loader) -> torch.Tensor:
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in proxy_loader]
    if not batches or sum(len(b) for b in batches) == 0:
        raise FusionError("the proxy set is empty: fusion needs unlabeled server samples")
    return torch.cat(batches).contiguous()


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model itself when its parameters are on `device`, else a copy moved there (the
    caller's model stays where it is)."""
    param = next(model.parameters(), None)
    if param is None or param.device == device:
        return model
    return copy.deepcopy(model).to(device)


def _check_models(models: list[nn.Module]) -> None:
    if not models:
        raise FusionError("no model to fuse")
    reference = {k: v.shape for k, v in models[0].state_dict().items()}
    for i, model in enumerate(models):
        state = model.state_dict()
        if {k: v.shape for k, v in state.items()} != reference:
            raise FusionError(f"model {i} has another architecture than model 0 (state dict keys or shapes differ)")
        for name, value in state.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise FusionError(f"model {i} has non-finite values in {name}")


def average_models(models: list[nn.Module], weights: list[float] | None = None) -> nn.Module:
    """Vanilla weight averaging: a copy of the first model holding the (weighted: FedAvg
    weighs by examples) mean of all models' floating-point tensors (integer buffers from
    the first)."""
    states = [m.state_dict() for m in models]
    w = [1.0] * len(models) if weights is None else [float(x) for x in weights]
    averaged = copy.deepcopy(models[0])
    averaged.load_state_dict({k: (sum(wi * s[k].double() for wi, s in zip(w, states)) / sum(w)).to(v.dtype)
                              if v.is_floating_point() else v.clone() for k, v in states[0].items()})
    return averaged


@torch.no_grad()
def reestimate_batchnorm(module: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Recompute the running statistics of the BatchNorms inside `module` on input x."""
    norms = [m for m in module.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the proxy batches
    # Each submodule's own mode comes back (a wrapper made by levels() is in training mode
    # while the layers it holds are not).
    modes = [(m, m.training) for m in module.modules()]
    module.train()
    for start in range(0, len(x), batch_size):
        module(x[start:start + batch_size])
    for m, mode in modes:
        m.training = mode
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


@torch.no_grad()
def restate_norm_statistics(module: nn.Module, reference: nn.Module) -> None:
    """Give each BatchNorm of `module` the running statistics of its namesake in
    `reference`, with its weight and bias changed so that its output in eval mode stays the
    same. Clients that never update the statistics then train every merged model in the
    same coordinates: the step SGD takes on the weight depends on the variance it divides by."""
    references = dict(reference.named_modules())
    for name, norm in module.named_modules():
        if not (isinstance(norm, _NORMS) and norm.track_running_stats and norm.affine):
            continue
        source = references[name]
        set_folded_norm(norm, *folded_norm(norm), source.running_mean.double(), source.running_var.double())


def _free_layer(probe: nn.Module) -> bool:
    """A plain Conv/Linear whose weights all train: it can take any matched function."""
    return (isinstance(probe, (nn.Conv2d, nn.Linear)) and not isinstance(probe, (ProjectedConv2d, ProjectedLinear))
            and all(p.requires_grad for p in probe.parameters()))


@torch.no_grad()
def _apply_activation(chain, pre_activation: torch.Tensor) -> torch.Tensor:
    return chain.stages[-1].act(pre_activation.clone())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


HEAD_TARGETS = ("log-probs", "logits")


def _check_head_target(kind: str) -> None:
    if kind not in HEAD_TARGETS:
        raise FusionError(f"unknown head target '{kind}': choose {' or '.join(HEAD_TARGETS)}")


def head_targets(logits: list[torch.Tensor], class_weights: torch.Tensor | None = None,
                 kind: str = "log-probs") -> torch.Tensor:
    """The fused head's target logits: per class, the models' mean, weighted per model by
    `class_weights` (models x classes, e.g. class counts; equal when None), of their
    log-probabilities ("log-probs": a weighted product of the models' predictions, each
    class judged by the models that saw it) or of their logits centred per sample ("logits").
    Both are logits centred per sample (softmax ignores the shift), so models' different
    logit offsets favour no class; the models' mean offset is added back, so identical
    models give back their own logits."""
    _check_head_target(kind)
    device = logits[0].device
    weights = (torch.ones(len(logits), logits[0].shape[1], device=device) if class_weights is None
               else class_weights.double().to(device))
    weights = weights / weights.sum(0, keepdim=True).clamp_min(1e-12)
    # log-probs score each class by the probability its experts give it; mean-centred logits
    # also carry each model's logit scale on the sample, whatever its confidence.
    offsets = [a.double().logsumexp(1, keepdim=True) if kind == "log-probs" else a.double().mean(1, keepdim=True)
               for a in logits]
    return (sum(w[None, :] * (a.double() - o) for w, a, o in zip(weights, logits, offsets))
            + sum(offsets) / len(offsets)).float()


@dataclass
class _Probes:
    """One level on the proxy inputs: each model's probe input and output (the level's
    neurons), and the fused model's level input, probe input and current probe output."""

    client_levels: list[Level]
    client_inputs: list[torch.Tensor]
    client_acts: list[torch.Tensor]
    fused_input: torch.Tensor
    fused_probe_input: torch.Tensor
    current: torch.Tensor


def _check_attributions(attributions: list[list[torch.Tensor]] | None, n_models: int,
                        fused_levels: list[Level]) -> None:
    """One finite score per neuron, for every model and level (None: uniform scores)."""
    if attributions is None:
        return
    if len(attributions) != n_models:
        raise FusionError(f"attributions for {len(attributions)} models, but {n_models} models")
    for i, per_level in enumerate(attributions):
        if len(per_level) != len(fused_levels):
            raise FusionError(f"model {i}: attributions for {len(per_level)} levels, the model has {len(fused_levels)}")
        for level, scores in zip(fused_levels, per_level):
            if scores.shape != (level.width,) or not torch.isfinite(scores).all():
                raise FusionError(f"model {i}, level {level.name}: attribution scores must be {level.width} finite "
                                  f"numbers, got shape {tuple(scores.shape)}")


@torch.no_grad()
def _probe_level(level: Level, client_levels: list[Level], inputs: list[torch.Tensor],
                 fused_input: torch.Tensor) -> tuple[_Probes, list[torch.Tensor]]:
    """Probe the models' and the fused model's level; also returns the models' level
    outputs, the next level's inputs."""
    probe_ins = [lv.probe_input(i) for lv, i in zip(client_levels, inputs)]
    client_acts = [lv.probe(p) for lv, p in zip(client_levels, probe_ins)]
    # A block probed whole: its output is the probe's (one forward pass per model, not two).
    whole = level.probe is level.module and level.prefix is None
    outputs = client_acts if whole else [lv(i) for lv, i in zip(client_levels, inputs)]
    fused_probe_in = level.probe_input(fused_input)
    probes = _Probes(client_levels, probe_ins, client_acts, fused_input, fused_probe_in, level.probe(fused_probe_in))
    return probes, outputs


def _level_chain(level: Level, fit: str) -> Chain | None:
    """The hidden level as a conv-norm chain to fit in closed form, or None: the head,
    a layer level (probed at its leading conv/linear), fit "gradient", or no chain."""
    if level.kind == "head" or level.probe is not level.module or fit == "gradient":
        return None
    return conv_norm_chain(level.module)


def _level_targets(level: Level, probes: _Probes, chain: Chain | None, scores: list[torch.Tensor] | None,
                   class_weights: torch.Tensor | None, head_target: str, max_dim: int, restarts: bool,
                   seed: int) -> tuple[torch.Tensor, Matching]:
    """The fused level's target output and the matching behind it (its targets are the
    pre-activations when the chain is fitted before its activation). The head matches
    classes one-to-one; a hidden level's neurons are clustered (`scores` None: uniform)."""
    if level.kind == "head":
        targets = head_targets(probes.client_acts, class_weights, head_target)
        cost = _mse(probes.current, targets) / max(_mse(targets, 0 * targets), 1e-12)
        return targets, Matching(targets, cost, 0.0, "classes")
    if scores is None:
        scores = [torch.ones(level.width) for _ in probes.client_acts]
    values = fused_values = None
    if chain is not None and not isinstance(chain.stages[-1].act, nn.Identity):
        # The fit is linear before the activation: average the members' pre-activations.
        with torch.no_grad():
            values = [conv_norm_chain(lv.module).outputs(p)[-1]
                      for lv, p in zip(probes.client_levels, probes.client_inputs)]
            fused_values = chain.outputs(probes.fused_probe_input)[-1]
    matching = match_level(probes.client_acts, scores, probes.current, max_dim=max_dim, seed=seed,
                           fresh_start=restarts and _free_layer(level.probe), values=values,
                           fused_values=fused_values, fixed_channels=chain is not None and chain.fixed_channels)
    targets = matching.targets if values is None else _apply_activation(chain, matching.targets)
    return targets, matching


def _fit_level(level: Level, probes: _Probes, chain: Chain | None, targets: torch.Tensor, matched: torch.Tensor,
               fit: str, ridge: float | None, grad_steps: int, seed: int) -> str:
    """Fit the fused level, fed its own input, to `targets`: a chain in closed form (its
    last stage to the pre-activation targets `matched`), else the probe in closed form
    unless fit is "gradient", else by gradient steps. Returns how it was fitted."""
    block = level.probe is level.module
    x = probes.fused_probe_input
    if block and chain is None:  # the block's BatchNorms first see the fused model's own input (the proxy)
        reestimate_batchnorm(level.module, probes.fused_input)
    if chain is not None and fit_chain(chain, x, [conv_norm_chain(lv.module) for lv in probes.client_levels],
                                       probes.client_inputs, matched - x if chain.skip else matched, ridge, seed=seed):
        how = "closed (chain)"
    elif fit in ("auto", "closed") and closed_form_fit(level.probe, x, targets, ridge, seed=seed):
        how = "closed"
    elif fit == "closed" and not block:
        raise FusionError(f"level {level.name}: no closed-form fit for {type(level.probe).__name__}")
    else:
        params = [p for p in level.probe.parameters() if p.requires_grad]
        gradient_fit(level.probe, params, x, targets, steps=grad_steps, seed=seed)
        how = "gradient"
    if not block:  # norms after the probe: statistics of the newly fitted outputs
        reestimate_batchnorm(level.module, probes.fused_input)
    return how


@torch.no_grad()
def _keep_if_better(level: Level, probes: _Probes, targets: torch.Tensor, saved: dict, loss_before: float,
                    how: str) -> tuple[str, float]:
    """Never worse than it was (a NaN fit is worse too): unless the fit lowered the
    level's loss, restore `saved`, the state before it. Returns how and the loss."""
    loss_after = _mse(level.probe(probes.fused_probe_input), targets)
    if loss_after < loss_before:
        return how, loss_after
    level.module.load_state_dict(saved)
    how += " (reverted)"
    # The averaged level's BatchNorm statistics belong to the averaged model's
    # inputs, not to the fused model's: refresh them if that alone helps.
    if any(isinstance(m, _NORMS) for m in level.module.modules()):
        reestimate_batchnorm(level.module, probes.fused_input)
        refreshed = _mse(level.probe(probes.fused_probe_input), targets)
        if refreshed < loss_before:
            return how + ", norms re-estimated", refreshed
        level.module.load_state_dict(saved)
    return how, loss_before


# The refinement trains the whole fused model to the head target: Adam at 1e-3 on the
# cross-entropy to the target's class plus the KL to its softmax (hard and soft labels, as
# in Hinton et al.'s distillation, both from the target), in batches of 128 from a pool of
# 8 pairwise mixes per proxy image (mixup's inputs: Zhang et al., arXiv 1710.09412) that
# the models label once, so the fused model learns the target beyond the proxy images;
# stopped after 200 steps without a lower held-out loss. Measured on round-1 clients
# (docs/results.md): the MSE to the target logits on the proxy images alone lost 10-32
# points of the log-probs target at high skew, whose margins are small (each class's
# experts are sure of their own classes); the KL alone lost 2-18, the class alone up to
# 1.7 more than both at Dirichlet 0.5. (Picking the checkpoint by held-out agreement, as
# FedDF does, depended on which 200 samples were held out.)
REFINE_LR, REFINE_BATCH, REFINE_PATIENCE, REFINE_MIXES = 1e-3, 128, 20, 8


@torch.no_grad()
def _in_chunks(function: Callable[[torch.Tensor], torch.Tensor], inputs: Callable[[torch.Tensor], torch.Tensor],
               count: int, size: int = 1024) -> torch.Tensor:
    """function(inputs(rows)) over rows 0..count-1, `size` rows at a time."""
    return torch.cat([function(inputs(torch.arange(i, min(i + size, count)))) for i in range(0, count, size)])


def _refine_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the target's class plus KL(target's softmax || the model's)."""
    log_probs = logits.log_softmax(1)
    return (F.nll_loss(log_probs, target.argmax(1))
            + F.kl_div(log_probs, target.log_softmax(1), log_target=True, reduction="batchmean"))


def refine(fused: nn.Module, x: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor], steps: int,
           seed: int = 0) -> dict:
    """Train the whole fused model (its trainable parameters) to `teacher(inputs)`, the
    head's target logits (its class and its softmax), on pairwise mixes of four fifths of
    the proxy inputs x; the parameters with the lowest loss on the held-out fifth are
    kept, the fitted ones included. The level-by-level fit leaves points of the target's
    accuracy on the table (each level fits its own target, the errors add up); the whole
    model recovers most of it. Returns the figures: steps, best_step (0: the fitted model
    kept), held-out loss_start and loss_best, seconds."""
    started = time.perf_counter()
    fused.eval()  # its BatchNorm statistics are those it will run with
    params = [p for p in fused.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    cut = len(x) // 5
    held, train = (x[order[:cut]], x[order[cut:]]) if cut else (x, x)
    # The pool is kept as pairs and shares, each batch mixed again: at high resolution the
    # mixed images themselves would not fit in memory.
    pairs = torch.randint(len(train), (2, REFINE_MIXES * len(train)), generator=generator)
    shares = torch.rand(pairs.shape[1], *[1] * (x.dim() - 1), generator=generator).to(x.device)

    def mixes(rows: torch.Tensor) -> torch.Tensor:
        return shares[rows] * train[pairs[0, rows]] + (1 - shares[rows]) * train[pairs[1, rows]]

    held_targets = _in_chunks(teacher, lambda rows: held[rows], len(held))
    pool_targets = _in_chunks(teacher, mixes, pairs.shape[1])

    def held_loss() -> float:
        return float(_refine_loss(_in_chunks(fused, lambda rows: held[rows], len(held)), held_targets))

    def batch_loss(step: int) -> torch.Tensor:
        rows = torch.randint(pairs.shape[1], (REFINE_BATCH,), generator=generator)
        return _refine_loss(fused(mixes(rows)), pool_targets[rows])

    result = early_stopped_adam(params, batch_loss, held_loss, steps, REFINE_LR, REFINE_PATIENCE)
    return {**asdict(result), "seconds": time.perf_counter() - started}


def fuse(models: list[nn.Module], proxy_loader, attributions: list[list[torch.Tensor]] | None = None,
         width: int | None = None, *, class_weights: torch.Tensor | None = None, fit: str = "auto",
         ridge: float | None = None, grad_steps: int = 100, max_dim: int = 4096, restarts: bool = True,
         refine_steps: int = 0, head_target: str = "log-probs", seed: int = 0, device: str | torch.device = "cpu"):
    """Fuse `models` (one architecture) into one model of the same architecture.

    For every level in order: run all models and the fused model on the proxy inputs,
    group all models' neurons into the fused level's width by attribution-weighted
    k-means, assign the targets to the fused channels (linear_sum_assignment), and fit
    the fused level, fed its own previous output, to them. The head matches classes
    one-to-one: its target is `head_targets(..., kind=head_target)`, the mean of the models'
    log-probabilities or centred logits, per class weighted by `class_weights` (models x
    classes, e.g. class counts) when given. `refine_steps` > 0: then `refine` to it.

    `attributions[m][l]` scores level l's neurons of model m (uniform when None).
    `fit`: "auto" (closed form where possible), "closed" or "gradient"; `ridge`: a fixed
    ridge strength for closed-form fits, or None to choose it on held-out proxy samples.
    `restarts`: also try k-means++ for free layers and keep it when clearly better (for
    models of independent initialisations); in federated rounds, where every client
    started from the same global model, neurons correspond and False keeps them so.
    `device`: where the models and the proxy run (e.g. "cuda" on a server with a GPU);
    the models given stay where they are and the fused model comes back on the CPU.
    k-means and the assignment run on the CPU wherever the models run.
    Returns (fused_model, report) where report["levels"] lists per-level figures."""
    started = time.perf_counter()
    if width is not None:
        raise FusionError("fusing into another width than the models' is not supported: pass width=None")
    if fit not in ("auto", "closed", "gradient"):
        raise FusionError(f"unknown fit '{fit}': choose auto, closed or gradient")
    _check_head_target(head_target)  # before any level's work
    device = torch.device(device)
    models = [on_device(m, device) for m in models]
    _check_models(models)
    x = _proxy_inputs(proxy_loader).to(device)
    model_levels = [levels(m) for m in models]
    fused = average_models(models)
    fused_levels = levels(fused)
    _check_attributions(attributions, len(models), fused_levels)
    for m in models + [fused]:
        m.eval()

    inputs, fused_in = [x] * len(models), x
    reports: list[LevelReport] = []
    for index, level in enumerate(fused_levels):
        level_started = time.perf_counter()
        probes, inputs = _probe_level(level, [lv[index] for lv in model_levels], inputs, fused_in)
        chain = _level_chain(level, fit)
        scores = None if attributions is None else [a[index] for a in attributions]
        targets, matching = _level_targets(level, probes, chain, scores, class_weights, head_target, max_dim,
                                           restarts, seed + index)
        loss_before = _mse(probes.current, targets)
        saved = copy.deepcopy(level.module.state_dict())  # to go back to if the fit makes it worse
        how = _fit_level(level, probes, chain, targets, matching.targets, fit, ridge, grad_steps, seed + index)
        how, loss_after = _keep_if_better(level, probes, targets, saved, loss_before, how)
        with torch.no_grad():
            fused_in = level(fused_in)
        reports.append(LevelReport(level.name, level.kind, level.width, how, matching.cost, matching.moved,
                                   matching.init, loss_before, loss_after, time.perf_counter() - level_started))
    refined = None
    if refine_steps > 0:
        def teacher(inputs: torch.Tensor) -> torch.Tensor:
            return head_targets([m(inputs) for m in models], class_weights, head_target)
        refined = refine(fused, x, teacher, refine_steps, seed)
    fused.cpu().eval()
    return fused, {"levels": [asdict(r) for r in reports], "refine": refined,
                   "seconds": time.perf_counter() - started, "models": len(models), "proxy_size": len(x)}
