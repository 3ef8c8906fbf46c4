"""A one-line progress report for long loads (stderr, rate-limited so it costs nothing)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .plan import Entry
from .reader import Stats


class ProgressPrinter:
    """Bytes and tensors done, throughput, on one rewritten line; rate-limited to ``every`` s.

    As ``VirtualStateDict(progress=...)`` it is called with the reader's stats after each
    tensor; exports feed it with :meth:`add` and :meth:`finish`.
    """

    def __init__(self, total_bytes: int, *, stream: TextIO | None = None, every: float = 0.5, verb: str = "") -> None:
        self.total = total_bytes
        self.stream = stream or sys.stderr
        self.every = every
        self.verb = verb
        self.start = time.perf_counter()
        self.last = self.start  # the first line comes after one interval (or at the end)
        self.done = self.tensors = 0
        self.ended = False  # the final line (with its newline) was written

    def __call__(self, stats: Stats, entry: Entry | None) -> None:
        self.done, self.tensors = stats.bytes_out, stats.tensors
        self._show(final=self.done >= self.total and not self.ended)

    def add(self, nbytes: int, tensors: int = 0) -> None:
        self.done += nbytes
        self.tensors += tensors
        self._show(final=False)

    def finish(self) -> None:
        self._show(final=True)

    def _show(self, *, final: bool) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and not final:
            return
        self.last = now
        self.ended = self.ended or final
        rate = self.done / max(now - self.start, 1e-9) / 2**20
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.stream.write(
            f"\rlazysd: {self.verb}{self.done / 2**30:7.2f} / {self.total / 2**30:.2f} GiB ({pct:5.1f}%), "
            f"{self.tensors} tensors, {rate:8.1f} MiB/s" + ("\n" if final else "")
        )
        self.stream.flush()
