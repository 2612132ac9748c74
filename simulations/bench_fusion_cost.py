"""Benchmark: what fusion costs as the number of models grows, and closed-form against
gradient level fits.

The models are copies of one network with independent random perturbations of every
weight (a stand-in for trained clients: the cost does not depend on what they learnt);
the proxy set is random images of the model's input size."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from rich.table import Table

from clients.task import TrainTask
from simulations.tables import make_console
from strategies.fusion import fuse

HELP = "fusion seconds for 2..16 models; closed-form vs gradient fits"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="simple-cnn")
    parser.add_argument("--projection", action="store_true")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--counts", default="2,4,8,16")
    parser.add_argument("--proxy-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)


def perturbed_copies(model: torch.nn.Module, count: int, scale: float = 0.05) -> list[torch.nn.Module]:
    copies = []
    for i in range(count):
        clone = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in clone.parameters():
                if p.requires_grad:
                    p.mul_(1 + scale * torch.randn(p.shape, generator=generator))
        copies.append(clone.eval())
    return copies


def main(args) -> int:
    torch.set_num_threads(args.threads)
    task = TrainTask(model=args.model, projection=args.projection, resolution=args.resolution)
    base = task.build_model(10).eval()
    channels, size = (1, 28) if args.model == "simple-cnn" else (3, args.resolution or 224)
    proxy = [torch.randn(args.proxy_size, channels, size, size, generator=torch.Generator().manual_seed(0))]
    console = make_console()
    table = Table(title=f"fusion cost, {args.model}{' (projected)' if args.projection else ''}, "
                        f"proxy {args.proxy_size}, {args.threads} thread(s)")
    for col in ("models", "fit", "seconds", "s per model", "mean fit loss after", "levels reverted"):
        table.add_column(col, justify="right")
    for count in [int(c) for c in args.counts.split(",")]:
        nets = perturbed_copies(base, count)
        for how in ("auto", "gradient") if count == int(args.counts.split(",")[0]) else ("auto",):
            started = time.perf_counter()
            _, report = fuse(nets, proxy, fit=how)
            seconds = time.perf_counter() - started
            losses = [r["loss_after"] for r in report["levels"]]
            reverted = sum("reverted" in r["fit"] for r in report["levels"])
            table.add_row(str(count), "closed where possible" if how == "auto" else "gradient only",
                          f"{seconds:.2f}", f"{seconds / count:.3f}", f"{np.mean(losses):.3e}", str(reverted))
    console.print(table)
    return 0
