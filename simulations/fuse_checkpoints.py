"""`fedfuse fuse CKPT... --out fused.pt`: one-shot fusion of trained checkpoints, with
weight averaging and the output ensemble printed beside it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

import data
import models
from clients import training
from clients.task import input_spec
from server.results import MODEL
from simulations.tables import make_console


class CheckpointError(ValueError):
    """A checkpoint that cannot be fused; the message names the file."""


def load_checkpoint(path: str | Path) -> tuple[dict, torch.nn.Module]:
    """A model.pt as `fedfuse run` writes it: {model, num_classes, state_dict, ...}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many kinds
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}): replace it") from err
    if not isinstance(saved, dict) or not {"model", "num_classes", "state_dict"} <= set(saved):
        raise CheckpointError(f"checkpoint {path} is not a fedfuse {MODEL} (needs model, num_classes, state_dict)")
    model = models.create(saved["model"], saved["num_classes"], pretrained=False)
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit {saved['model']}: {str(err).splitlines()[0]}") from err
    return saved, model.eval()


def main(args) -> int:
    from clients.training import ensemble_accuracy
    from strategies.fusion import average_models, fuse

    loaded = [load_checkpoint(p) for p in args.checkpoints]
    names = {saved["model"] for saved, _ in loaded}
    if len(names) > 1:
        raise CheckpointError(f"checkpoints hold different models ({', '.join(sorted(names))}): fuse one architecture")
    model_name, nets = names.pop(), [m for _, m in loaded]
    resolution = loaded[0][0].get("settings", {}).get("resolution", 0)
    ds = data.load(args.dataset, args.data_root or None)
    spec = input_spec(model_name, ds, resolution)
    order = np.random.default_rng(args.seed).permutation(len(ds.train_labels))[: args.proxy_size]
    proxy = data.BatchLoader(ds.train_images[order], None, spec, 256)
    test = data.BatchLoader(ds.test_images, ds.test_labels, spec, 500)

    fused, report = fuse(nets, proxy, seed=args.seed)
    rows = [(Path(p).parent.name or str(p), training.evaluate(m, test)["accuracy"]) for p, m in zip(args.checkpoints, nets)]
    rows += [("weight average", training.evaluate(average_models(nets), test)["accuracy"]),
             ("output ensemble", ensemble_accuracy(nets, test)),
             ("fusion", training.evaluate(fused, test)["accuracy"])]
    table = Table(title=f"one-shot fusion of {len(nets)} {model_name} checkpoints ({report['seconds']:.1f} s, "
                        f"proxy {report['proxy_size']})")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    for name, accuracy in rows:
        table.add_row(name, f"{accuracy:.4f}")
    make_console().print(table)
    out = copy.deepcopy(loaded[0][0])
    out.update(state_dict=models.fold(fused).state_dict(), fusion_report=report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out)
    return 0
