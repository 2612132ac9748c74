"""The run directory: its file names, how it is written (atomically where a kill could
cut a file) and read, and when a run counts as finished (its summary.json exists)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

CONFIG = "config.json"  # every setting of the run
PARTITION = "partition.json"  # class names, per-client histogram, proxy size, label skew
METRICS = "metrics.jsonl"  # one object per round
CLIENTS = "clients.jsonl"  # one object per client per round
CHECKPOINT = "checkpoint.pt"  # after every round: what --resume continues from
SUMMARY = "summary.json"  # written last: a run is finished when it exists
MODEL = "model.pt"  # the final global model


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def start(self, config: dict, partition: dict) -> None:
        """Create the folder and write what is known before round 1; earlier round
        files of the same folder are replaced."""
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, CLIENTS, SUMMARY, MODEL):
            (self.path / name).unlink(missing_ok=True)
        _atomic_write(self.path / CONFIG, json.dumps(config, indent=2, default=_jsonable))
        _atomic_write(self.path / PARTITION, json.dumps(partition, default=_jsonable))

    def save_checkpoint(self, checkpoint: dict) -> None:
        """Write, then rename: a kill at any instant leaves the previous checkpoint whole."""
        tmp = self.path / (CHECKPOINT + ".tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, self.path / CHECKPOINT)

    def load_checkpoint(self) -> dict | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
            raise ValueError(f"{path} is not a readable fedfuse checkpoint ({type(err).__name__}): "
                             "delete it to start the run over") from None

    def keep_rounds(self, last_round: int) -> None:
        """Drop records of rounds after `last_round` (a round cut off by a kill)."""
        for name in (METRICS, CLIENTS):
            path = self.path / name
            if path.exists():
                rows = [r for r in read_jsonl(path) if r["round"] <= last_round]
                _atomic_write(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))

    def append(self, name: str, rows: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for row in rows:
                f.write(json.dumps(row, default=_jsonable) + "\n")
            f.flush()

    def append_round(self, metrics: dict, clients: list[dict] = ()) -> None:
        """One round's records: its metrics line and its client lines."""
        self.append(METRICS, [metrics])
        if clients:
            self.append(CLIENTS, list(clients))

    def finish(self, summary: dict, model_state: dict) -> None:
        """The final model, then the summary: a run with a summary is complete."""
        tmp = self.path / (MODEL + ".tmp")
        torch.save(model_state, tmp)
        os.replace(tmp, self.path / MODEL)
        _atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2, default=_jsonable))


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / SUMMARY).exists()


def read_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / METRICS)


def read_clients(run_dir: str | Path) -> list[dict]:
    """The client lines, or none for a run that has not written any (centralised)."""
    path = Path(run_dir) / CLIENTS
    return read_jsonl(path) if path.exists() else []


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _per_level_mean(per_round: list[list[float]]) -> list[float] | None:
    """Mean over rounds, level by level, of the rounds with the last round's levels (a
    full fine-tuning phase after projection may change them)."""
    if not per_round:
        return None
    same = [r for r in per_round if len(r) == len(per_round[-1])]
    return np.mean(np.array(same, dtype=float), 0).tolist()


def summarise(settings, strategy: str, history: list[dict], client_lines: list[dict], **extra) -> dict:
    """summary.json of a run (a federation, or the centralised reference) from its
    settings, its per-round history (round 0: the starting model) and client lines."""
    spec, task = settings.federation, settings.task
    rounds = [r for r in history if r["round"] > 0]
    fused = [r for r in rounds if "fit_loss_after" in r]
    return {
        "strategy": strategy, "dataset": spec.dataset, "partition": spec.partition, "alpha": spec.alpha,
        "classes_per_client": spec.classes_per_client, "clients": spec.clients, "model": task.model,
        "projection": task.projection, "pointwise": task.pointwise if task.projection else "",
        "full_finetune_rounds": settings.full_finetune_rounds, "seed": spec.seed,
        "rounds": len(rounds),
        "initial_accuracy": history[0]["accuracy"],
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in history),
        "accuracy_curve": [r["accuracy"] for r in history],
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "mean_round_s": _mean([r["round_s"] for r in rounds]) or 0.0,
        "mean_aggregate_s": _mean([r["aggregate_s"] for r in rounds]) or 0.0,
        "mean_fusion_s": _mean([r["fusion_s"] for r in rounds if "fusion_s" in r]),
        "mean_distill_s": _mean([r["distill_s"] for r in rounds if "distill_s" in r]),
        "mean_clients_used": _mean([r.get("clients_used", r["clients_ok"]) for r in rounds if "clients_ok" in r]),
        "mean_attribution_s": _mean([c["attribution_s"] for c in client_lines if "attribution_s" in c]),
        # Fusion's figures: per level, the mean over rounds of its fit loss before and after
        # the fit; the share of channels the matching moved; rounds that sent the fused model.
        "fit_loss_before_per_level": _per_level_mean([r["fit_loss_before"] for r in fused]),
        "fit_loss_after_per_level": _per_level_mean([r["fit_loss_after"] for r in fused]),
        "mean_assignment_moved": _mean([r["assignment_moved"] for r in fused if not np.isnan(r["assignment_moved"])]),
        "rounds_fusion_selected": sum(r.get("selected") == "fusion" for r in fused) if fused else None,
        **extra,
    }
