"""Wall time and peak memory of a stage, for provenance, reports and the benchmark.

Peak host memory is the process's resident set sampled in a background thread (the kernel's own high-water mark
covers the whole process life, so it cannot tell one stage from the next); peak GPU memory comes from torch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import TracebackType

import psutil
import torch


@dataclass
class Usage:
    wall_s: float = 0.0
    peak_rss_bytes: int = 0
    peak_cuda_bytes: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "wall_s": round(self.wall_s, 2),
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
            "peak_cuda_mib": round(self.peak_cuda_bytes / 2**20, 1),
        }


class MeasureUsage:
    """`with MeasureUsage() as usage: ...` then read `usage.wall_s`, `usage.peak_rss_bytes`."""

    def __init__(self, *, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.usage = Usage()
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Usage:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        self._thread.start()
        return self.usage

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.usage.peak_rss_bytes = max(self.usage.peak_rss_bytes, self._process.memory_info().rss)
        self.usage.wall_s = time.perf_counter() - self._t0
        if torch.cuda.is_available():
            self.usage.peak_cuda_bytes = torch.cuda.max_memory_allocated()
