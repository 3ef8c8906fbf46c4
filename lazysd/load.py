"""``lazysd.load``: load a checkpoint into a model and say what happened.

``model.load_state_dict(VirtualStateDict(path))`` is the headline API and needs nothing from
here. :func:`load` wraps it for users who also want a report (missing and unexpected keys,
bytes read, seconds, throughput) and a strict check that fails *before* any byte is read:
torch's own strict check runs after every tensor has been copied.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import OptionError, StateDictMismatchError, shortened
from .fp8 import FP8_DTYPES
from .plan import Entry
from .progress import ProgressPrinter
from .reader import Stats
from .virtual import VirtualStateDict


@dataclass(frozen=True)
class LoadReport:
    """What one :func:`load` did.

    Attributes:
        missing_keys: model keys the checkpoint does not have (left untouched).
        unexpected_keys: checkpoint keys the model does not have (never read).
        tensors: tensors (or tensor shards) written.
        bytes_read: checkpoint tensor bytes read from disk during the load.
        seconds: wall time of the load.
        staging_peak: most staging bytes held at once during the load.
    """

    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    tensors: int
    bytes_read: int
    seconds: float
    staging_peak: int

    @property
    def throughput(self) -> float:
        """Bytes read per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"loaded {self.tensors} tensors, {self.bytes_read / 2**20:.1f} MiB in {self.seconds:.2f} s "
            f"({self.throughput / 2**20:.0f} MiB/s); {len(self.missing_keys)} missing, "
            f"{len(self.unexpected_keys)} unexpected keys"
        )


def load(
    model: torch.nn.Module,
    path_or_vsd: str | os.PathLike[str] | VirtualStateDict,
    *,
    strict: bool = True,
    assign: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    threads: int | None = None,
    max_inflight_bytes: int | None = None,
    progress: bool | Callable[[Stats, Entry], None] = False,
    mmap: bool | None = None,
    revision: str | None = None,
) -> LoadReport:
    """Load a checkpoint into ``model`` through ``model.load_state_dict`` and report on it.

    Args:
        model: the model; its parameters already allocated (``assign=False``) or on the
            meta device (``assign=True``).
        path_or_vsd: a checkpoint directory, or an open :class:`VirtualStateDict` (then the
            read options below must be left out: they were chosen when it was opened).
        strict: raise :class:`~lazysd.errors.StateDictMismatchError` if the model's keys
            and the checkpoint's differ, before reading anything.
        assign: replace parameters by freshly materialized ones (for meta-device models)
            instead of copying into them; each ends as a plain ``nn.Parameter`` keeping the
            model's ``requires_grad``, buffers stay plain tensors.
        dtype: cast floating-point tensors to this dtype (with ``assign=True`` this sets
            the parameters' dtype; with ``assign=False`` the parameter's dtype wins anyway).
        device: where ``assign=True`` materializes parameters (default CPU).
        threads: reader threads (default: the cores this process may use, see
            :mod:`lazysd.tuning`); ``max_inflight_bytes``: staging memory that
            reads may run ahead of copies (default 32 MiB).
        progress: True prints a one-line progress report to stderr; a callable
            ``(stats, entry)`` is called after each tensor.
        mmap: with ``assign=True``, the fastest path: unchanged tensors become copy-on-write
            views of the files (not read now), concatenated ones keep the HF memory order
            (no transpose), so parameters may be strided (see ``VirtualStateDict``).
        revision: branch, tag or commit when ``path_or_vsd`` is a Hugging Face cache
            repository or hub id (see ``VirtualStateDict``).

    Returns:
        A :class:`LoadReport`.

    Example:
        >>> import lazysd
        >>> report = lazysd.load(model, "/ckpt/Step-3.5-Flash", strict=False)   # doctest: +SKIP
        >>> print(report)                                                        # doctest: +SKIP
        loaded 2151 tensors, 380912.4 MiB in 190.12 s (2003 MiB/s); 0 missing, 0 unexpected keys
    """
    options: dict[str, Any] = {
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "max_inflight_bytes": max_inflight_bytes,
        "progress": progress or None,
        "mmap": mmap,
        "revision": revision,
    }
    given = {k: v for k, v in options.items() if v is not None}
    if isinstance(path_or_vsd, VirtualStateDict):
        if given:
            raise OptionError(
                f"{path_or_vsd.checkpoint.path}: {', '.join(sorted(given))} cannot change an open VirtualStateDict; "
                "pass them to VirtualStateDict(...) or give lazysd.load the checkpoint path"
            )
        return _load(model, path_or_vsd, strict=strict, assign=assign)
    with VirtualStateDict(path_or_vsd, **given) as vsd:
        return _load(model, vsd, strict=strict, assign=assign)


def _load(model: torch.nn.Module, vsd: VirtualStateDict, *, strict: bool, assign: bool) -> LoadReport:
    wanted = model.state_dict(keep_vars=True).keys()
    missing = tuple(k for k in wanted if k not in vsd)
    unexpected = tuple(k for k in vsd if k not in wanted)
    if strict and (missing or unexpected):
        raise StateDictMismatchError(
            f"{vsd.checkpoint.path}: checkpoint keys do not match {type(model).__name__}'s "
            f"(nothing was read): {len(missing)} missing {_listing(missing)}, "
            f"{len(unexpected)} unexpected {_listing(unexpected)}; pass strict=False to load the common keys"
        )
    _check_values(model, vsd, wanted, assign=assign)
    stats, ckpt = vsd.stats, vsd.checkpoint
    tensors0, bytes0 = stats.tensors, ckpt.bytes_read
    stats.staging_peak = stats.staging_live  # the report's peak is this load's
    t0 = time.perf_counter()
    if isinstance(vsd.reader.progress, ProgressPrinter) and vsd.reader.progress.sizes is not None:
        vsd.reader.progress.expect(k for k in wanted if k in vsd)  # 100% means this load's keys
    # Only the keys the model asks for: nothing is even looked up for the others.
    model.load_state_dict({k: vsd[k] for k in wanted if k in vsd}, strict=False, assign=assign)
    return LoadReport(
        missing_keys=missing,
        unexpected_keys=unexpected,
        tensors=stats.tensors - tensors0,
        bytes_read=ckpt.bytes_read - bytes0,
        seconds=time.perf_counter() - t0,
        staging_peak=stats.staging_peak,
    )


def _check_values(model: torch.nn.Module, vsd: VirtualStateDict, wanted: Any, *, assign: bool) -> None:
    """Shapes (and, when copying, dtypes) of every common key agree, before anything is read.

    torch's own check reports shape mismatches only after it has overwritten every other
    parameter; a dtype that cannot be cast fails halfway through.
    """
    params = model.state_dict(keep_vars=True)
    problems = []
    for key in wanted:
        if key not in vsd:
            continue
        param, entry = params[key], vsd.entry(key)
        if tuple(param.shape) != entry.shape:
            problems.append(f"{key}: model {list(param.shape)}, checkpoint {list(entry.shape)}")
        elif not assign and (why := _cast_problem(vsd.dtype_of(entry), param.dtype)) is not None:
            problems.append(f"{key}: checkpoint {vsd.dtype_of(entry)} into the model's {param.dtype}: {why}")
    if problems:
        raise StateDictMismatchError(
            f"{vsd.checkpoint.path}: {len(problems)} tensor(s) do not fit {type(model).__name__} (nothing was read):\n  "
            + "\n  ".join(shortened(problems, 20))
        )


_CASTABLE: dict[tuple[torch.dtype, torch.dtype], str | None] = {}


def _cast_problem(src: torch.dtype, dst: torch.dtype) -> str | None:
    """Why ``copy_`` from ``src`` into ``dst`` would fail or give wrong values, or None.

    Refused: FP8 kept as stored (``fp8="keep"``) into a non-FP8 parameter (cast without its
    block scales), complex into real (drops the imaginary part), floating point into
    integers or bool (truncates), and any pair torch cannot copy (tried once on one element).
    """
    if src == dst:
        return None
    if (src, dst) not in _CASTABLE:
        problem = None
        if src in FP8_DTYPES and dst not in FP8_DTYPES:
            problem = "FP8 values cast without their block scales (use fp8='dequantize')"
        elif src.is_complex and not dst.is_complex:
            problem = "complex into real drops the imaginary part"
        elif (src.is_floating_point or src.is_complex) and not (dst.is_floating_point or dst.is_complex):
            problem = "floating point into an integer type truncates"
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.zeros(1, dtype=dst).copy_(torch.zeros(1, dtype=src))
            except (RuntimeError, TypeError) as e:
                problem = f"torch cannot copy it ({str(e).splitlines()[0][:100]})"
        _CASTABLE[src, dst] = problem
    return _CASTABLE[src, dst]


def _listing(keys: tuple[str, ...]) -> str:
    return "[" + ", ".join(shortened(list(keys), 5)) + "]"
