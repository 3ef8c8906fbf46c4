"""Measurements for tests and benchmarks: peak memory, the reads a load made, fresh processes.

Example:
    >>> with PeakRSS() as peak:                              # doctest: +SKIP
    ...     model.load_state_dict(vsd)
    >>> peak.result                                          # doctest: +SKIP
    {'seconds': 1.9, 'total': 312475648, 'anon': 301989888, 'file': 4096}
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["PeakRSS", "record_reads", "run_fresh", "status"]


def status() -> dict[str, int]:
    """This process's VmHWM, VmRSS, RssAnon and RssFile from ``/proc/self/status``, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}  # type: ignore[union-attr]


class PeakRSS:
    """Peak resident memory of a ``with`` block, above the process's RSS when it began (Linux).

    On entry VmHWM is reset to the current RSS (``/proc/self/clear_refs`` = 5); on exit
    ``result`` holds ``seconds`` (wall time of the block), ``total`` (VmHWM minus the starting
    VmRSS: exact, kept by the kernel) and its private ``anon`` (RssAnon) and file-backed
    ``file`` (RssFile) parts, sampled every ``sample_s`` seconds by a thread (``None``: not
    sampled, both 0).

    The block starts after a full garbage collection: a fresh process leaves one due
    (everything ``import torch`` made sits in the oldest generation, uncounted), and it
    fires in whichever code allocates next, measured or not. Inside a warm 2.8 GiB
    Qwen3-MoE ``load_state_dict`` it took 124-147 ms of 0.62-0.76 s (3 fresh processes;
    0.47-0.60 s after a collection), and a peer that allocates less would skip it.
    """

    def __init__(self, sample_s: float | None = 0.002) -> None:
        self.sample_s = sample_s

    def __enter__(self) -> PeakRSS:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.base = status()
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if self.sample_s else None
        if self._thread:
            self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            s = status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(self.sample_s)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        if self._thread:
            self._thread.join()
        s = status()
        sampled = self._thread is not None
        self.total = s["VmHWM"] - self.base["VmRSS"]
        self.result = {
            "seconds": self.seconds,
            "total": self.total,
            "anon": max(self.anon, s["RssAnon"]) - self.base["RssAnon"] if sampled else 0,
            "file": max(self.file, s["RssFile"]) - self.base["RssFile"] if sampled else 0,
        }


def record_reads(vsd: Any) -> list[tuple[str, int, int]]:
    """Every read of ``vsd`` from now on as (HF key, byte start, length), recorded as it happens.

    Wraps ``vsd.checkpoint.read_batch``, which every local read goes through (pread,
    transposing, batched).
    """
    reads: list[tuple[str, int, int]] = []
    original = vsd.checkpoint.read_batch

    def recording(batch, run):  # noqa: ANN001, ANN202
        done = original(batch, run)
        reads.extend((info.key, start, n) for ok, (info, runs) in zip(done, batch) for start, n in runs if ok)
        return done

    vsd.checkpoint.read_batch = recording
    return reads


def run_fresh(*args: str) -> dict[str, Any]:
    """``python *args`` in a fresh process that can import this lazysd: its last stdout line, as JSON.

    A process that fails gives ``{"error": its last stderr line}``.
    """
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
