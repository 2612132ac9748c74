"""A mixin that puts every Flower strategy under the same run discipline: seeded
sampling by partition id, validation of replies, arrival-order-free aggregation, and a
record of each round (timings, bytes, per-client lines) for the run directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log

from strategies.sampling import FixedNodes, PartitionSampler
from strategies.validation import reply_problem


@dataclass
class RoundRecord:
    server_round: int
    started: float
    clients_sent: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    aggregate_s: float = 0.0
    clients_ok: int = 0
    clients_failed: int = 0
    clients_rejected: int = 0
    clients: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # strategy-specific figures for metrics.jsonl


def mean_train_loss(records, weighted_by_key: str) -> MetricRecord:
    """Example-weighted mean of the clients' training loss (the only train metric
    worth averaging; timings and ids are per client and go to clients.jsonl)."""
    pairs = [(r["metrics"]["loss"], r["metrics"][weighted_by_key]) for r in records]
    total = sum(w for _, w in pairs)
    return MetricRecord({"train-loss": sum(l * w for l, w in pairs) / total})


OUTLIER_FACTOR = 100.0  # an update moving 100x the global model's norm is rejected


class RecordedRounds:
    """Place before the Flower strategy in the bases: class X(RecordedRounds, FedAvg)."""

    sampler: PartitionSampler | None = None
    current: RoundRecord | None = None
    # Rounds already run by an earlier phase of the same run (projected, then full
    # fine-tuning): Flower counts from 1 in each start(), clients and records do not.
    round_offset: int = 0
    # The valid client models of the latest round (their ArrayRecords): the output
    # ensemble of the last round is a reference in benchmark reports.
    last_updates: list[ArrayRecord] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        server_round += self.round_offset
        self.current = RoundRecord(server_round, started=time.perf_counter())
        self._expected = {k: (tuple(v.shape), v.numpy().dtype) for k, v in arrays.items()}
        self._global = {k: v.numpy() for k, v in arrays.items()}
        if self.sampler is not None:
            grid = FixedNodes(grid, self.sampler.sample_nodes(server_round))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current.clients_sent = len(messages)
        self.current.bytes_down = arrays.count_bytes() * len(messages)
        return messages

    def _partition(self, msg: Message) -> int:
        if not msg.has_error() and "metrics" in msg.content.metric_records:
            return int(msg.content.metric_records["metrics"].get("partition-id", -1))
        return self.sampler.partition_of(msg.metadata.src_node_id) if self.sampler else -1

    def aggregate_train(self, server_round: int, replies):
        server_round += self.round_offset
        record = self.current or RoundRecord(server_round, started=time.perf_counter())
        valid: list[Message] = []
        checked: list[tuple[Message, dict]] = []
        for msg in replies:
            line = {"round": server_round, "partition": self._partition(msg), "node": msg.metadata.src_node_id}
            if not msg.has_error() and "faults" in msg.content.config_records:
                line["injected"] = str(msg.content.config_records["faults"].get("injected", ""))
            if msg.has_error():
                line.update(status="failed", reason=msg.error.reason)
                record.clients_failed += 1
                log(WARNING, "round %d: client %d (node %d) failed: %s",
                    server_round, line["partition"], line["node"], msg.error.reason)
            elif (problem := self.reply_problem(msg.content)) is not None:
                self._reject(record, line, problem)
            else:
                checked.append((msg, line))
            record.clients.append(line)
        # A scaled update passes every check above: reject one that moved far more than
        # the size of the global model itself (not relative to the other clients: at
        # high skew their number of local steps differs a hundredfold).
        limit = OUTLIER_FACTOR * max(self._norm(self._global), 1.0)
        for msg, line in checked:
            moved = self._norm(self._global, msg.content["arrays"])
            if moved > limit:
                self._reject(record, line, f"update moved {moved:.3g} from the global model, more than "
                                           f"{OUTLIER_FACTOR:g}x its norm")
                continue
            line.update(status="ok", **_client_fields(msg))
            valid.append(msg)
            record.clients_ok += 1
            record.bytes_up += line["bytes_up"]
        record.clients.sort(key=lambda c: c["partition"])
        # Floating-point sums depend on order: aggregate in partition order, not arrival order.
        valid.sort(key=self._partition)
        if valid:
            self.last_updates = [msg.content["arrays"] for msg in valid]
        started = time.perf_counter()
        arrays, metrics = self.aggregate_valid(server_round, valid, record) if valid else (None, None)
        record.aggregate_s = time.perf_counter() - started
        if not valid:
            log(WARNING, "round %d: no valid update, keeping the previous global model", server_round)
        self.current = record
        return arrays, metrics

    def _reject(self, record: RoundRecord, line: dict, problem: str) -> None:
        line.update(status="rejected", reason=problem)
        record.clients_rejected += 1
        log(WARNING, "round %d: rejected update of client %d (node %d): %s",
            record.server_round, line["partition"], line["node"], problem)

    @staticmethod
    def _norm(reference: dict[str, np.ndarray], arrays: ArrayRecord | None = None) -> float:
        """L2 norm of the floating-point tensors of `reference`, or of `arrays` minus them."""
        total = 0.0
        for name, value in reference.items():
            if np.issubdtype(value.dtype, np.floating):
                diff = value.astype(np.float64) if arrays is None else arrays[name].numpy().astype(np.float64) - value
                total += float((diff ** 2).sum())
        return total ** 0.5

    def reply_problem(self, content) -> str | None:
        return reply_problem(content, self._expected)

    def aggregate_valid(self, server_round: int, valid: list[Message], record: RoundRecord):
        """Aggregate validated replies, in partition order: the Flower strategy's own rule."""
        return super().aggregate_train(server_round, valid)

    def server_state(self) -> dict:
        """What the strategy carries from round to round (a server optimiser's moments),
        saved with the checkpoint; none for FedAvg."""
        return {}

    def load_server_state(self, state: dict) -> None:
        """Continue from a checkpoint's `server_state()`."""


def uplink_bytes(content) -> int:
    """What a reply carries for the strategy: the model and, for fusion, the attributions
    and class histogram (the "metrics" record, telemetry every strategy sends, is not counted)."""
    return (sum(record.count_bytes() for record in content.array_records.values())
            + sum(record.count_bytes() for name, record in content.metric_records.items() if name != "metrics"))


def _client_fields(msg: Message) -> dict:
    metrics = msg.content.metric_records["metrics"]
    placement = msg.content.config_records.get("placement", {})
    return {
        "num_examples": int(metrics["num-examples"]),
        "train_s": float(metrics.get("train-s", 0.0)),
        "loss": float(metrics.get("loss", float("nan"))),
        "bytes_up": uplink_bytes(msg.content),
        "host": placement.get("host", ""),
        "pid": placement.get("pid", ""),
        "device": placement.get("device", ""),
        "gpu_ids": placement.get("gpu-ids", ""),
        "train_start": float(metrics.get("train-start", 0.0)),
        "train_end": float(metrics.get("train-end", 0.0)),
        **({"attribution_s": float(metrics["attribution-s"])} if "attribution-s" in metrics else {}),
    }
