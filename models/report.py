"""Parameter report: total, trainable and bytes per update, by layer type."""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from models.projection import NORM_LAYERS, ProjectedConv2d, ProjectedLinear
from models.state import exchanged_names


def _kind(module: nn.Module) -> str:
    if isinstance(module, ProjectedConv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "projected depthwise conv"
        return "projected pointwise conv" if tuple(module.kernel_size) == (1, 1) else "projected conv"
    if isinstance(module, ProjectedLinear):
        return "projected linear"
    if isinstance(module, nn.Conv2d):
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise conv"
        return "pointwise conv" if tuple(module.kernel_size) == (1, 1) else "conv"
    if isinstance(module, NORM_LAYERS):
        return "norm"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__


def parameter_report(model: nn.Module) -> dict:
    """Counts per layer type. `total` is the size of the plain (folded) model: frozen
    kernels held as buffers count, gamma does not (folding absorbs it); `trainable`
    counts what the optimiser updates, gamma included."""
    rows: dict[str, dict] = defaultdict(lambda: {"modules": 0, "total": 0, "trainable": 0})
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        frozen_kernel = module.weight.numel() if isinstance(module, (ProjectedConv2d, ProjectedLinear)) else 0
        if not own and not frozen_kernel:
            continue
        row = rows[_kind(module)]
        row["modules"] += 1
        row["total"] += frozen_kernel + sum(p.numel() for n, p in module.named_parameters(recurse=False) if n != "gamma")
        row["trainable"] += sum(p.numel() for p in own if p.requires_grad)
    state = model.state_dict()
    update_bytes = sum(state[n].numel() * state[n].element_size() for n in exchanged_names(model))
    return {
        "total": sum(r["total"] for r in rows.values()),
        "trainable": sum(r["trainable"] for r in rows.values()),
        "bytes_per_update": update_bytes,
        "by_type": dict(sorted(rows.items())),
    }


def format_report(report: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'layer type':<26}{'modules':>8}{'params':>12}{'trainable':>12}")
    for kind, row in report["by_type"].items():
        lines.append(f"{kind:<26}{row['modules']:>8}{row['total']:>12,}{row['trainable']:>12,}")
    lines.append(f"{'all':<26}{'':>8}{report['total']:>12,}{report['trainable']:>12,}")
    lines.append(f"bytes per update: {report['bytes_per_update']:,} "
                 f"({100 * report['trainable'] / max(report['total'], 1):.1f}% of parameters trainable)")
    return "\n".join(lines)
