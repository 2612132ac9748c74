"""Local training and evaluation: plain PyTorch, no flwr.

Models and batches use the channels-last layout: on CPU it made EfficientNet-Lite0
training steps 3x faster and the small CNN's 20% faster here."""

from __future__ import annotations

import time

import torch
from torch import nn

NORM_STATS = ("batch", "frozen")


def train(
    model: nn.Module, loader, epochs: int, lr: float, momentum: float = 0.9,
    weight_decay: float = 0.0, proximal_mu: float = 0.0, device: str | torch.device = "cpu",
    norm_stats: str = "batch", steps: int = 0,
) -> dict:
    """SGD with momentum for `epochs` passes over `loader`, or, with `steps` > 0, for
    exactly that many steps, passing over `loader` as often as needed (each pass
    reshuffled by the loader): every client then takes the same number of steps,
    whatever its shard's size.

    norm_stats "frozen": BatchNorm layers normalise with the running statistics the model
    came with and never update them (their affine weights still train); "batch": each
    batch's own statistics, as in plain training mode.

    With proximal_mu > 0 this is FedProx's local objective: the loss plus
    mu/2 * ||w - w_global||^2 over the trainable weights, w_global being the weights
    the model had on entry."""
    model.to(device, memory_format=torch.channels_last).train()
    if norm_stats == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    criterion = nn.CrossEntropyLoss()
    started = time.perf_counter()
    total_loss, total_seen, taken = 0.0, 0, 0
    passes = epochs if steps <= 0 else -(-steps // max(len(loader), 1))
    for _ in range(passes):
        total_loss, total_seen = 0.0, 0  # report the last pass's loss
        for inputs, labels in loader:
            if 0 < steps <= taken:
                break
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), labels)
            objective = loss
            if anchor is not None:
                drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                objective = loss + 0.5 * proximal_mu * drift
            objective.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            total_seen += len(labels)
            taken += 1
    return {
        "loss": total_loss / max(total_seen, 1),
        "steps": taken,
        "train_s": time.perf_counter() - started,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str | torch.device = "cpu") -> dict:
    """Mean cross-entropy and accuracy (a fraction in [0, 1])."""
    model.to(device, memory_format=torch.channels_last).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, seen = 0.0, 0, 0
    for inputs, labels in loader:
        logits = model(inputs)
        loss += criterion(logits, labels).item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"loss": loss / max(seen, 1), "accuracy": correct / max(seen, 1), "num_examples": seen}


@torch.no_grad()
def predict(model: nn.Module, loader, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """All logits and labels of `loader`, on the CPU."""
    model.to(device, memory_format=torch.channels_last).eval()
    batches = [(model(inputs).cpu(), labels.cpu()) for inputs, labels in loader]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@torch.no_grad()
def ensemble_accuracy(models: list[nn.Module], loader) -> float:
    """Accuracy of the output ensemble: the class with the highest mean softmax."""
    correct = seen = 0
    for inputs, labels in loader:
        probs = sum(m.eval()(inputs).softmax(1) for m in models)
        correct += (probs.argmax(1) == labels).sum().item()
        seen += len(labels)
    return correct / max(seen, 1)
