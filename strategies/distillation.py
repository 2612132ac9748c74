"""Ensemble distillation on unlabeled server data (FedDF: Lin et al., "Ensemble
Distillation for Robust Model Fusion in Federated Learning", NeurIPS 2020, arXiv
2006.07242, Algorithm 1). Plain PyTorch, no flwr.

The student starts from the clients' weighted average and is trained to match the
clients' averaged logits on proxy samples (KL at a temperature), with the paper's
recipe: Adam at 1e-3, batches of 128, at most 1e4 steps, evaluated every 100 steps,
stopped after 1e3 steps without improvement, best checkpoint kept. The paper picks that
checkpoint on labelled server data; fedfuse's server has none, so it is picked on
held-out proxy samples, by agreement with the ensemble's predicted class (ties: the
lower KL). The average itself is the step-0 checkpoint: a distillation that never beats
it on the held-out samples gives the average back."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

STEPS, LR, BATCH_SIZE, EVAL_EVERY, PATIENCE, TEMPERATURE = 10_000, 1e-3, 128, 100, 1_000, 1.0
HELD_OUT_SHARE = 5  # one proxy sample in five is kept out of the fit, to judge by


@dataclass
class DistillReport:
    steps: int  # steps taken before stopping
    best_step: int  # 0: the average was kept
    agreement_start: float  # held-out agreement with the ensemble: the average's
    agreement_best: float  # and the kept checkpoint's
    seconds: float


@torch.no_grad()
def ensemble_logits(models: list[nn.Module], x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The teacher: the clients' logits averaged (FedDF's AVGLOGITS)."""
    for m in models:
        m.eval()
    return torch.cat([torch.stack([m(x[i:i + batch_size]) for m in models]).mean(0)
                      for i in range(0, len(x), batch_size)])


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss: KL(teacher || student) at `temperature`, times T^2 so
    gradients keep their scale across temperatures."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                    reduction="batchmean") * temperature ** 2


@torch.no_grad()
def _score(model: nn.Module, x: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[float, float]:
    """(agreement with the teacher's class, -KL): larger is better, compared in that order."""
    model.eval()
    logits = model(x)
    return float((logits.argmax(1) == teacher.argmax(1)).double().mean()), -float(_kl(logits, teacher, temperature))


def distill(student: nn.Module, x_fit: torch.Tensor, teacher_fit: torch.Tensor, x_held: torch.Tensor,
            teacher_held: torch.Tensor, *, steps: int = STEPS, lr: float = LR, temperature: float = TEMPERATURE,
            batch_size: int = BATCH_SIZE, eval_every: int = EVAL_EVERY, patience: int = PATIENCE,
            seed: int = 0, device: str | torch.device = "cpu") -> tuple[nn.Module, DistillReport]:
    """Train a copy of `student` on `x_fit` to match `teacher_fit` (logits); return the
    checkpoint that scores best on (`x_held`, `teacher_held`), step 0 included. The
    training runs on `device`; the checkpoint comes back on the CPU."""
    started = time.perf_counter()
    device = torch.device(device)
    model = copy.deepcopy(student).to(device)
    x_fit, teacher_fit, x_held, teacher_held = (t.to(device) for t in (x_fit, teacher_fit, x_held, teacher_held))
    best_state, best_step = copy.deepcopy(model.state_dict()), 0
    start = best = _score(model, x_held, teacher_held, temperature)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order, cursor, step = torch.randperm(len(x_fit), generator=generator), 0, 0
    while step < steps and step - best_step < patience:
        if cursor + batch_size > len(order):  # a new pass over the proxy samples
            order, cursor = torch.randperm(len(x_fit), generator=generator), 0
        batch = order[cursor:cursor + batch_size]
        cursor += batch_size
        model.train()
        optimizer.zero_grad()
        _kl(model(x_fit[batch]), teacher_fit[batch], temperature).backward()
        optimizer.step()
        step += 1
        if step % eval_every == 0:
            score = _score(model, x_held, teacher_held, temperature)
            if score > best:
                best, best_step, best_state = score, step, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.cpu().eval()
    return model, DistillReport(step, best_step, start[0], best[0], time.perf_counter() - started)


def split_proxy(proxy: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed, seeded split: four fifths to fit on, one fifth held out to judge by."""
    order = torch.randperm(len(proxy), generator=torch.Generator().manual_seed(seed))
    cut = len(proxy) // HELD_OUT_SHARE
    return proxy[order[cut:]], proxy[order[:cut]]
