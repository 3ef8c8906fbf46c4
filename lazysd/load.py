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
        bytes_received: tensor bytes this rank received from other ranks of its node
            instead of reading them (``share="node"``, see :mod:`lazysd.share`).
        requests: storage requests made during the load (ranged GETs for a remote
            checkpoint, ``pread`` calls for a local one).
    """

    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    tensors: int
    bytes_read: int
    seconds: float
    staging_peak: int
    bytes_received: int = 0
    requests: int = 0

    @property
    def throughput(self) -> float:
        """Bytes read per second."""
        return self.bytes_read / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        received = f", {self.bytes_received / 2**20:.1f} MiB received from the node" if self.bytes_received else ""
        return (
            f"loaded {self.tensors} tensors, {self.bytes_read / 2**20:.1f} MiB read in {self.requests} "
            f"requests{received} in {self.seconds:.2f} s "
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
    storage_options: dict[str, Any] | None = None,
    revision: str | None = None,
    share: str | None = "node",
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
        storage_options: for a URL (``s3://``, ``https://``, ``hf://`` ...), options of
            its fsspec filesystem (credentials, endpoint).
        share: with a process group, ``"node"`` (default) reads each tensor that several
            ranks of a node need once on the node and sends it to the others
            (:mod:`lazysd.share`); None reads everything on every rank. Every rank of the
            group must then call ``load`` (it runs one ``all_gather_object``). An open
            VirtualStateDict keeps the ``share=`` it was opened with.

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
        "storage_options": storage_options,
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
    with VirtualStateDict(path_or_vsd, share=share, **given) as vsd:
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
    tensors0, bytes0, requests0 = stats.tensors, ckpt.bytes_read, ckpt.read_calls
    taken0 = vsd.bytes_received  # values taken from the node (lazysd.nodeshare), counted in stats
    stats.staging_peak = stats.staging_live  # the report's peak is this load's
    t0 = time.perf_counter()
    if isinstance(vsd.reader.progress, ProgressPrinter) and vsd.reader.progress.sizes is not None:
        vsd.reader.progress.expect(k for k in wanted if k in vsd)  # 100% means this load's keys
    # Only the keys the model asks for: nothing is even looked up for the others.
    values = {k: vsd[k] for k in wanted if k in vsd}
    received = received_tensors = 0
    if vsd.share == "node" and _distributed():
        from .share import share_node

        shared = share_node(vsd, values, model.state_dict(keep_vars=True), assign=assign)
        received, received_tensors = shared.bytes_received, shared.tensors_received
        for key, dest in shared.filled.items():
            if assign:
                values[key] = _like(values[key], dest)
            else:
                del values[key]  # already in the parameter
    if not (assign and vsd.reader.options.mmap):  # those are mapped, not read: nothing to gain
        _fill_ahead(vsd, values, model.state_dict(keep_vars=True), assign=assign)
    model.load_state_dict(values, strict=False, assign=assign)
    return LoadReport(
        missing_keys=missing,
        unexpected_keys=unexpected,
        tensors=stats.tensors - tensors0 + received_tensors,
        bytes_read=ckpt.bytes_read - bytes0,
        seconds=time.perf_counter() - t0,
        staging_peak=stats.staging_peak,
        bytes_received=received + vsd.bytes_received - taken0,
        requests=ckpt.read_calls - requests0,
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
            f"{vsd.checkpoint.path}: {len(problems)} tensor(s) do not fit {type(model).__name__} (nothing was read):\n "
            " " + "\n  ".join(shortened(problems, 20))
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


def _fill_ahead(
    vsd: VirtualStateDict, values: dict[str, Any], params: dict[str, torch.Tensor], *, assign: bool
) -> None:
    """Read the values straight into their destinations before ``load_state_dict`` sees them.

    ``load_state_dict`` copies one tensor after the other: the reader threads would wait at
    the end of every tensor, a small tensor would be read by one thread alone, and over a
    network each tensor would cost its own round trips. Here a local checkpoint's tensors go
    through one pipeline (:meth:`lazysd.reader.Reader.fill_many`), and a remote one's are
    read up to 8 at once. Filled keys are replaced in ``values`` by their filled tensors
    (``assign``) or removed (already in the parameter).
    """
    from concurrent.futures import ThreadPoolExecutor

    from .share import lazy_destination

    jobs: dict[str, tuple[Any, torch.Tensor]] = {}
    for key, value in values.items():
        found = lazy_destination(value, assign, params.get(key))
        if found is not None and found[1].device.type != "meta":
            jobs[key] = found
    if vsd.checkpoint.local:
        vsd.reader.fill_many((lazy.entry, lazy.box, dest) for lazy, dest in jobs.values())
    else:
        with ThreadPoolExecutor(8, thread_name_prefix="lazysd-fill") as pool:
            list(pool.map(lambda job: job[0].read_into(job[1]), jobs.values()))
    for key, (_, dest) in jobs.items():
        if assign:
            values[key] = _like(values[key], dest)
        else:
            del values[key]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _like(value: Any, local: torch.Tensor) -> torch.Tensor:
    """``local`` as ``value`` is: a DTensor with the same mesh and placements, or plain."""
    if hasattr(value, "_local_tensor"):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, value.device_mesh, value.placements, run_check=False, shape=value.shape, stride=value.stride()
        )
    return local


def _listing(keys: tuple[str, ...]) -> str:
    return "[" + ", ".join(shortened(list(keys), 5)) + "]"
