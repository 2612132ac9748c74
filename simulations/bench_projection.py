"""Benchmark: what projection saves (trainable parameters, bytes per update) and what
its training step costs against plain fine-tuning of the same model, in one run; and
a local epoch of the projected model on real images, with the depthwise convs as now
(output scaled, 1x1 maps by their kernel's centre) and as before (a conv with the scaled
kernel), in one run.

Times are medians over interleaved repeats (plain, projected, plain, ...), so a noisy
neighbour slows both sides alike."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from rich.table import Table

import data
import models
from clients import training
from clients.task import input_spec
from simulations.bench_fusion_cost import perturbed_copies
from simulations.tables import make_console
from strategies.fusion import fuse

HELP = "projection's sizes and step time against plain fine-tuning"

BENCH_MODELS = {
    "efficientnet-lite0": dict(pretrained=True),
    "timm:resnet18": dict(pretrained=False),  # random init: only timing and sizes matter here
}


def add_arguments(parser) -> None:
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epoch-images", type=int, default=640,
                        help="Fashion-MNIST images in the timed local epoch (0: skip it)")
    parser.add_argument("--epoch-resolution", type=int, default=32, help="the headline's EfficientNet input side")
    parser.add_argument("--fusion-models", type=int, default=10,
                        help="also time fusion of this many projected models, before and now (0: skip)")


def _step_fn(model: torch.nn.Module, batch_size: int, resolution: int):
    model = model.to(memory_format=torch.channels_last).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return time.perf_counter() - started

    return step


def step_times(variants: dict[str, torch.nn.Module], batch_size: int, resolution: int, repeats: int) -> dict[str, float]:
    steps = {name: _step_fn(m, batch_size, resolution) for name, m in variants.items()}
    for step in steps.values():  # warm-up: allocator, kernels
        step(), step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(step())
    return {name: statistics.median(s) for name, s in samples.items()}


def scaled_kernel(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose projected depthwise convs run as they did before: a conv with the
    scaled kernel, on 1x1 maps too. The same function by another path."""
    before = copy.deepcopy(model)
    for module in before.modules():
        if isinstance(module, models.ProjectedConv2d):
            module.scales_output, module.centre = False, None
    return before


def epoch_times(variants: dict[str, torch.nn.Module], images: int, resolution: int, batch_size: int,
                repeats: int = 3) -> dict[str, float]:
    """Median seconds of one local epoch (clients.training.train) on `images` Fashion-MNIST
    training images per variant, interleaved."""
    dataset = data.load("fashion-mnist")
    spec = input_spec("efficientnet-lite0", dataset, resolution)
    loader = data.BatchLoader(dataset.train_images[:images], dataset.train_labels[:images], spec, batch_size,
                              shuffle=True)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            samples[name].append(training.train(model, loader, epochs=1, lr=0.01)["train_s"])
    return {name: statistics.median(s) for name, s in samples.items()}


def fusion_times(model: torch.nn.Module, count: int, resolution: int, proxy_size: int = 500) -> dict[str, float]:
    """Seconds of one fusion of `count` perturbed copies of `model` on random proxy
    images, with the depthwise convs as before and as now; and now on the GPU
    (`--server-device cuda`) when this process sees one."""
    proxy = torch.randn(proxy_size, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
    runs = [("before", scaled_kernel(model), "cpu"), ("now", model, "cpu")]
    if torch.cuda.is_available():
        runs.append(("now, cuda", model, "cuda"))
    times = {}
    for label, variant, device in runs:
        copies = perturbed_copies(variant, count)
        if device == "cuda":  # CUDA's context and cuDNN's first kernels, outside the timing
            fuse(copies[:2], [proxy[:64]], None, restarts=False, seed=0, device=device)
            torch.cuda.synchronize()
        started = time.perf_counter()
        fuse(copies, [proxy], None, restarts=False, seed=0, device=device)
        times[label] = time.perf_counter() - started
    return times


def main(args) -> int:
    torch.set_num_threads(args.threads)
    console = make_console()
    for name, options in BENCH_MODELS.items():
        torch.manual_seed(0)
        plain = models.create(name, 10, **options)
        variants = {"full fine-tuning": plain}
        variants.update({f"projected, 1x1 {p}": models.project(plain, pointwise=p) for p in models.POINTWISE_POLICIES})

        sizes = Table(title=f"{name}: what one client trains and sends")
        for col in ("variant", "params", "trainable", "trainable %", "bytes per update", "vs full"):
            sizes.add_column(col, justify="left" if col == "variant" else "right")
        full_bytes = models.parameter_report(plain)["bytes_per_update"]
        for label, model in variants.items():
            r = models.parameter_report(model)
            sizes.add_row(label, f"{r['total']:,}", f"{r['trainable']:,}", f"{100 * r['trainable'] / r['total']:.1f}",
                          f"{r['bytes_per_update']:,}", f"{r['bytes_per_update'] / full_bytes:.3f}")
        console.print(sizes)

        timed = {k: v for k, v in variants.items() if k in ("full fine-tuning", "projected, 1x1 freeze", "projected, 1x1 project")}
        timed["projected, 1x1 freeze, depthwise kernel scaled (before)"] = scaled_kernel(variants["projected, 1x1 freeze"])
        times = step_times(timed, args.batch_size, args.resolution, args.repeats)
        table = Table(title=f"{name}: training step, batch {args.batch_size} at {args.resolution}px, "
                            f"{args.threads} thread(s), median of {args.repeats}")
        for col in ("variant", "step s", "vs full fine-tuning"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for label, seconds in times.items():
            table.add_row(label, f"{seconds:.4f}", f"{seconds / times['full fine-tuning']:.2f}x")
        console.print(table)
    console.print("target: projected step at most 1.15x the full fine-tuning step")
    if args.epoch_images:
        torch.manual_seed(0)
        projected = models.project(models.create("efficientnet-lite0", 10, pretrained=True), pointwise="freeze")
        times = epoch_times({"before: depthwise kernel scaled": scaled_kernel(projected),
                             "now: output scaled, centre tap on 1x1": projected},
                            args.epoch_images, args.epoch_resolution, args.batch_size)
        table = Table(title=f"projected efficientnet-lite0: one local epoch, {args.epoch_images} Fashion-MNIST images "
                            f"at {args.epoch_resolution}px, batch {args.batch_size}, {args.threads} thread(s), "
                            f"median of 3")
        for col in ("variant", "epoch s", "speed-up"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        slowest = max(times.values())
        for label, seconds in times.items():
            table.add_row(label, f"{seconds:.2f}", f"{slowest / seconds:.2f}x")
        console.print(table)
        console.print("target: the local epoch at least 2x faster than before")
        if args.fusion_models:
            fused = fusion_times(projected, args.fusion_models, args.epoch_resolution)
            console.print(f"fusion of {args.fusion_models} projected models on 500 proxy images at "
                          f"{args.epoch_resolution}px: before {fused['before']:.1f} s, now {fused['now']:.1f} s "
                          f"({fused['before'] / fused['now']:.2f}x faster)"
                          + (f"; on the GPU {fused['now, cuda']:.1f} s ({fused['now'] / fused['now, cuda']:.2f}x the "
                             f"CPU's speed)" if "now, cuda" in fused else ""))
    return 0
