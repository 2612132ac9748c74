"""Where a client runs: torch threads, device and the placement Ray gave it."""

from __future__ import annotations

import os
import socket

import torch


def configure_threads(cpus: float) -> int:
    """One torch thread per CPU granted: oversubscribing 2 cores with 2 clients of
    2 threads each made an epoch several times slower."""
    threads = max(1, int(cpus))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def gpu_ids() -> list[str]:
    """GPU ids Ray assigned to this worker (empty outside Ray or without GPUs)."""
    try:
        import ray

        if ray.is_initialized():
            return [str(g) for g in ray.get_gpu_ids()]
    except Exception:  # noqa: BLE001 - not in a Ray worker
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g for g in visible.split(",") if g]


def pick_device() -> torch.device:
    # Ray restricts CUDA_VISIBLE_DEVICES to the assigned GPU, so cuda:0 is ours.
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def placement() -> dict[str, str]:
    return {
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "device": str(pick_device()),
        "gpu-ids": ",".join(gpu_ids()),
    }
