"""Live display of rounds and clients (rich), fed by a Grid wrapper that sees each reply
as it arrives."""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


class RunProgress:
    """Two bars: rounds of the run, and clients of the current round."""

    def __init__(self, rounds: int, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
            console=self.console, disable=not enabled, transient=False,
        )
        self._rounds = self._progress.add_task("rounds ", total=rounds, note="")
        self._clients = self._progress.add_task("clients", total=0, note="")

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()

    def messages_sent(self, count: int) -> None:
        self._progress.reset(self._clients, total=count, note="training")

    def reply_received(self) -> None:
        self._progress.advance(self._clients)

    def round_done(self, row: dict) -> None:
        note = f"acc {row['accuracy']:.4f}  loss {row['loss']:.4f}"
        self._progress.update(self._rounds, advance=1, note=note)
        self._progress.update(self._clients, note="aggregated")
        if self.enabled:
            self._progress.console.print(
                f"round {row['round']:>3}  acc {row['accuracy']:.4f}  loss {row['loss']:.4f}  "
                f"clients ok {row['clients_ok']} failed {row['clients_failed']} "
                f"rejected {row['clients_rejected']}  {row['round_s']:.1f}s"
            )


class ProgressGrid(Grid):
    """Delegates to the real Grid; its send_and_receive reports each reply."""

    pull_interval = 0.05

    def __init__(self, grid: Grid, progress: RunProgress):
        self._grid, self._progress = grid, progress

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:  # e.g. federated evaluation switched off
            return []
        self._progress.messages_sent(len(messages))
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            for reply in self.pull_messages(pending):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
                self._progress.reply_received()
            if pending:
                time.sleep(self.pull_interval)
        return replies
