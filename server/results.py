"""The run directory: config.json, partition.json, metrics.jsonl, clients.jsonl,
checkpoint.pt (after every round), summary.json and model.pt."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


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
        for name in ("metrics.jsonl", "clients.jsonl", "summary.json", "model.pt"):
            (self.path / name).unlink(missing_ok=True)
        _atomic_write(self.path / "config.json", json.dumps(config, indent=2, default=_jsonable))
        _atomic_write(self.path / "partition.json", json.dumps(partition, default=_jsonable))

    def save_checkpoint(self, checkpoint: dict) -> None:
        """Write, then rename: a kill at any instant leaves the previous checkpoint whole."""
        torch.save(checkpoint, self.path / "checkpoint.pt.tmp")
        os.replace(self.path / "checkpoint.pt.tmp", self.path / "checkpoint.pt")

    def load_checkpoint(self) -> dict | None:
        path = self.path / "checkpoint.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear error
            raise ValueError(f"{path} is not a readable fedfuse checkpoint ({type(err).__name__}): "
                             "delete it to start the run over") from None

    def keep_rounds(self, last_round: int) -> None:
        """Drop records of rounds after `last_round` (a round cut off by a kill)."""
        for name in ("metrics.jsonl", "clients.jsonl"):
            path = self.path / name
            if path.exists():
                rows = [r for r in read_jsonl(path) if r["round"] <= last_round]
                _atomic_write(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in rows))

    def append(self, name: str, rows: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for row in rows:
                f.write(json.dumps(row, default=_jsonable) + "\n")
            f.flush()

    def finish(self, summary: dict, model_state: dict) -> None:
        torch.save(model_state, self.path / "model.pt.tmp")
        os.replace(self.path / "model.pt.tmp", self.path / "model.pt")
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2, default=_jsonable))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
