"""A one-line progress report for long loads (stderr, rate-limited so it costs nothing)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .plan import Entry
from .reader import Stats


class ProgressPrinter:
    """Callable for ``VirtualStateDict(progress=...)``: bytes and tensors done, throughput."""

    def __init__(self, total_bytes: int, *, stream: TextIO | None = None, every: float = 0.5) -> None:
        self.total = total_bytes
        self.stream = stream or sys.stderr
        self.every = every
        self.start = time.perf_counter()
        self.last = self.start  # the first line comes after one interval (or at the end)

    def __call__(self, stats: Stats, entry: Entry) -> None:
        now = time.perf_counter()
        done = stats.bytes_out >= self.total
        if now - self.last < self.every and not done:
            return
        self.last = now
        rate = stats.bytes_out / max(now - self.start, 1e-9) / 2**20
        pct = 100.0 * stats.bytes_out / self.total if self.total else 100.0
        self.stream.write(
            f"\rlazysd: {stats.bytes_out / 2**30:7.2f} / {self.total / 2**30:.2f} GiB ({pct:5.1f}%), "
            f"{stats.tensors} tensors, {rate:8.1f} MiB/s" + ("\n" if done else "")
        )
        self.stream.flush()
