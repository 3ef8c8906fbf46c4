"""A one-line progress report for long loads (stderr, rate-limited so it costs nothing)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TextIO

from .plan import Entry
from .reader import Stats


class ProgressPrinter:
    """Bytes and tensors done, throughput, on one rewritten line; rate-limited to ``every`` s.

    As ``VirtualStateDict(progress=...)`` it is given ``sizes`` (native key -> bytes of this
    rank's box, at the dtype it is read as) and called after each tensor read: it counts each
    key once, in the unit of ``sizes`` (not the destination's dtype, which may differ), and
    writes the final line when every key was read; a second load through the same mapping
    starts a new count. Exports feed it with :meth:`add` and :meth:`finish`.
    """

    def __init__(
        self,
        total_bytes: int,
        *,
        stream: TextIO | None = None,
        every: float = 0.5,
        verb: str = "",
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.total = total_bytes if sizes is None else sum(sizes.values())
        self.sizes = sizes
        self.expected: set[str] = set(sizes or ())  # the keys of the load being reported
        self.seen: set[str] = set()
        self.stream = stream or sys.stderr
        self.every = every
        self.verb = verb
        self.start = time.perf_counter()
        self.last = self.start  # the first line comes after one interval (or at the end)
        self.done = self.tensors = 0
        self.ended = False  # the final line (with its newline) was written

    def __call__(self, stats: Stats, entry: Entry | None) -> None:
        if self.sizes is None or entry is None:
            self.done, self.tensors = stats.bytes_out, stats.tensors
            self._show(final=self.done >= self.total and not self.ended)
            return
        if self.ended:  # a new load through the same mapping
            self.seen.clear()
            self.done = self.tensors = 0
            self.start = self.last = time.perf_counter()
            self.ended = False
        if entry.key in self.seen or entry.key not in self.expected:
            return
        self.seen.add(entry.key)
        self.done += self.sizes[entry.key]
        self.tensors = len(self.seen)
        self._show(final=len(self.seen) == len(self.expected))

    def expect(self, keys: Iterable[str]) -> None:
        """Count the next load as these keys only (``lazysd.load`` of a model with fewer keys)."""
        assert self.sizes is not None
        self.expected = {k for k in keys if k in self.sizes}
        self.total = sum(self.sizes[k] for k in self.expected)
        self.seen.clear()
        self.done = self.tensors = 0
        self.start = self.last = time.perf_counter()
        self.ended = False

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
        # A unit that shows something on small loads too (not "0.00 / 0.00 GiB").
        shift, unit = next((b, u) for b, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B")) if self.total >= 1 << b or b == 0)
        self.stream.write(
            f"\rlazysd: {self.verb}{self.done / 2**shift:7.2f} / {self.total / 2**shift:.2f} {unit} ({pct:5.1f}%), "
            f"{self.tensors} tensors, {rate:8.1f} MiB/s" + ("\n" if final else "")
        )
        self.stream.flush()
