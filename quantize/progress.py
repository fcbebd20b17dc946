"""Progress reporting for long work: one small protocol the library calls, three renderings the CLI picks.

The library only calls `start`, `advance`, `finish` and `log`; `RichProgress` draws bars for people,
`JsonProgress` prints one JSON object per line for scripts and schedulers, `NullProgress` stays silent (tests).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, TextIO


class Progress(Protocol):
    def start(self, task: str, total: int, **info: Any) -> None: ...

    def advance(self, task: str, steps: int = 1, **info: Any) -> None: ...

    def finish(self, task: str, **info: Any) -> None: ...

    def log(self, message: str, **info: Any) -> None: ...


class NullProgress:
    def start(self, task: str, total: int, **info: Any) -> None:
        pass

    def advance(self, task: str, steps: int = 1, **info: Any) -> None:
        pass

    def finish(self, task: str, **info: Any) -> None:
        pass

    def log(self, message: str, **info: Any) -> None:
        pass


class JsonProgress:
    """One JSON object per line: {"event": "start"|"advance"|"finish"|"log", "task", "done", "total", "t", ...}."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.done: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.t0 = time.monotonic()

    def _emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "t": round(time.monotonic() - self.t0, 3), **fields}
        self.stream.write(json.dumps(record, default=str) + "\n")
        self.stream.flush()

    def start(self, task: str, total: int, **info: Any) -> None:
        self.done[task], self.total[task] = 0, total
        self._emit("start", task=task, done=0, total=total, **info)

    def advance(self, task: str, steps: int = 1, **info: Any) -> None:
        self.done[task] = self.done.get(task, 0) + steps
        self._emit("advance", task=task, done=self.done[task], total=self.total.get(task), **info)

    def finish(self, task: str, **info: Any) -> None:
        self._emit("finish", task=task, done=self.done.get(task), total=self.total.get(task), **info)

    def log(self, message: str, **info: Any) -> None:
        self._emit("log", message=message, **info)


class RichProgress:
    """Bars on stderr for people; use as a context manager around the work."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        self._bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._ids: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def start(self, task: str, total: int, **info: Any) -> None:
        self._ids[task] = self._bars.add_task(task, total=total)

    def advance(self, task: str, steps: int = 1, **info: Any) -> None:
        if task in self._ids:
            self._bars.advance(self._ids[task], steps)

    def finish(self, task: str, **info: Any) -> None:
        if task in self._ids:
            self._bars.update(self._ids[task], completed=self._bars.tasks[self._ids[task]].total)

    def log(self, message: str, **info: Any) -> None:
        self._bars.console.log(message)
