"""Carry out read plans: read exactly the planned bytes and write them into a destination.

:func:`Reader.fill` takes a native :class:`~lazysd.plan.Entry`, a box of it (the whole tensor,
or one rank's shard) and a destination tensor of the box's shape, asks
:func:`lazysd.reads.plan_reads` for the read items (what to read, from where, into which
region: decided there, pure) and executes each item with ``pread`` in one of three ways:
straight into the destination where its memory is in source order (no permutation, no cast);
through the transpose kernel, which reads cache-sized blocks and transposes them into the
destination (expert weights, :mod:`lazysd.transpose`); else into a bounded staging buffer
then copied into a view of the destination (casts, FP8 dequantization, other devices). No
full-size temporary is built, and each HF byte is read once.

Reads of bytes in the page cache (a warm load) that go straight into place or through the
kernel are made in one call of the compiled kernel per fill (:func:`lazysd.transpose.read_many`:
the GIL released once, ``threads`` threads splitting the reads evenly). Cold ones, and
where the kernel is not built, are read job by job: the calling thread and a small thread
pool share them; staged reads run ahead of the copies, but never more than
``max_inflight_bytes`` of staging ahead: that is the memory bound of a load. A cold load of
a VirtualStateDict's own values is read ahead on streams of its own, into a bounded set of
slots the fills copy from (:mod:`lazysd.prefetch`).
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from ctypes import memmove
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import tuning
from .checkpoint import Checkpoint
from .errors import ShapeMismatchError
from .fp8 import dequantize
from .geometry import Box, box_shape, full_box, inverse_permutation
from .memory import populate
from .plan import Entry
from .pool import ReadPool
from .pread import RangeReader
from .prefetch import MOST, PIECE, SLOTS, Prefetcher, rank_windows, shared_pages
from .reads import SHARES, Destination, MiB, ReadItem, plan_reads, source_ranges
from .transpose import copy_into, copy_transposed, kernel_available, read_many, read_transposed, transposed_job


@dataclass(frozen=True)
class ReadOptions:
    """How reads are carried out (keyword options of :class:`~lazysd.VirtualStateDict`).

    Attributes:
        threads: reader threads; 0 reads on the calling thread; None: chosen from the
            cores this process may use and the storage (:func:`lazysd.tuning.default_threads`).
        chunk_bytes: target size of one read (source rows are never split); None: chosen
            from the storage (:func:`lazysd.tuning.default_chunk_bytes`).
        max_inflight_bytes: staging memory that reads may run ahead of copies.
        mmap: materialize tensors that need no conversion as copy-on-write views of the
            file mapping instead of reading them (see :meth:`Reader.mapped`).
        direct: read bulk ranges that are not in the page cache with ``O_DIRECT``
            (:mod:`lazysd.pread`); False: plain ``pread`` only.
    """

    threads: int | None = None
    chunk_bytes: int | None = None
    max_inflight_bytes: int = 32 * MiB
    mmap: bool = False
    direct: bool = True

    def resolved(self, path: str | None = None) -> ReadOptions:
        """These options with the machine's defaults filled in for ``threads``/``chunk_bytes``."""
        return replace(
            self,
            threads=tuning.default_threads(path) if self.threads is None else self.threads,
            chunk_bytes=tuning.default_chunk_bytes(path) if self.chunk_bytes is None else self.chunk_bytes,
        )


@dataclass
class Stats:
    """Counters of one VirtualStateDict's reads, for reports and tests."""

    tensors: int = 0  # destinations filled
    bytes_out: int = 0  # bytes written into destinations
    staging_live: int = 0  # staging bytes allocated now
    staging_peak: int = 0  # most staging bytes ever allocated at once
    seconds: float = 0.0  # time spent in fill()


@dataclass
class _Fill:
    """One destination of :meth:`Reader.fill_many`: done when its last job is."""

    entry: Entry
    dest: torch.Tensor
    t0: float
    left: int


@dataclass(frozen=True)
class _Job:
    """A read item and the destination of its fill (``base``); :attr:`dest` is the view of
    it the item's method writes."""

    item: ReadItem
    base: torch.Tensor
    fill: _Fill | None = None  # set in fill_many: counted down as jobs finish

    @functools.cached_property
    def dest(self) -> torch.Tensor:
        """direct: the destination region seen in source order (contiguous); fused: the
        region with the new axes of dims dropped (the kernel transposes into it); staged:
        the region. Made when first asked for: the batched reads of cached bytes need only
        the region's address and layout (:meth:`kernel_job`), and a view op costs
        microseconds, a small tensor's read not many more."""
        item, dest = self.item, self.base
        box = item.dest_box
        if item.dims == tuple(range(dest.dim())):
            # Unpermuted (most tensors): the region itself, made with as few view ops as it takes.
            shape = dest.shape
            if box[1:] == full_box(shape)[1:]:
                whole = not box or box[0] == (0, shape[0])
                return dest if whole else dest.narrow(0, box[0][0], box[0][1] - box[0][0])
            return dest[tuple(slice(lo, hi) for lo, hi in box)]
        # One strided view, its sizes and strides worked out here: a stacked tensor binds an
        # item per expert, and slicing, dropping the stacking dims and permuting cost a view op each.
        stride = dest.stride()
        offset = dest.storage_offset() + self._first(stride)
        if item.method == "staged":  # the region itself
            return dest.as_strided(box_shape(box), stride, offset)
        kept = self._kept(stride)  # the region without its stacking dims (fused: as it is) ...
        if item.method == "direct":  # ... seen in source order (contiguous there)
            kept = [kept[i] for i in inverse_permutation([d for d in item.dims if d is not None])]
        return dest.as_strided([n for n, _ in kept], [st for _, st in kept], offset)

    def _first(self, stride: tuple[int, ...]) -> int:
        """The region's first element, counted from the destination's (in elements)."""
        return sum(lo * st for (lo, _), st in zip(self.item.dest_box, stride))

    def _kept(self, stride: tuple[int, ...]) -> list[tuple[int, int]]:
        """``(size, stride)`` of each dim of the region but the stacking ones (fused: what
        the kernel transposes into)."""
        return [(hi - lo, st) for (lo, hi), st, d in zip(self.item.dest_box, stride, self.item.dims) if d is not None]

    def kernel_job(self, fd: int) -> tuple[int, ...]:
        """The item (direct or fused, one byte run) as a job of
        :func:`lazysd.transpose.read_many`: its region's address and layout worked out from
        the destination's, without a view (a direct region is one contiguous range of
        memory: the plan decided so)."""
        item, base = self.item, self.base
        offset = item.source.offset + item.runs[0][0]
        stride, z = base.stride(), base.element_size()
        address = base.data_ptr() + self._first(stride) * z
        if item.method == "direct":
            return (fd, offset, address, item.data_bytes)
        kept = self._kept(stride)
        return transposed_job(fd, offset, address, [n for n, _ in kept], [st for _, st in kept], z)


def _check_shape(entry: Entry, box: Box, dest: torch.Tensor) -> None:
    expected = tuple(hi - lo for lo, hi in box)
    if tuple(dest.shape) != expected:
        raise ShapeMismatchError(
            f"{entry.key}: destination shape {list(dest.shape)} is not the requested box {list(expected)}"
        )


def to_native(block: torch.Tensor, dims: tuple[int | None, ...]) -> torch.Tensor:
    """A block in source dimension order seen in native order (``Source.dims``): a view."""
    moved = block.permute([d for d in dims if d is not None])
    for i, d in enumerate(dims):
        if d is None:
            moved = moved.unsqueeze(i)
    return moved


def _as_bytes(t: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor's memory."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _memory_order(entry: Entry) -> list[int] | None:
    """Native dims ordered as the sources lay them out in memory, if all sources agree.

    New (stacking) axes go outermost. None where the order is the native one anyway, or
    the sources disagree.
    """
    orders = {
        tuple(sorted(range(len(src.dims)), key=lambda i: (-1, i) if src.dims[i] is None else (src.dims[i], 0)))
        for src in entry.sources
    }
    if len(orders) != 1:
        return None
    order = list(orders.pop())
    return None if order == sorted(order) else order


def _staging_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-aligned staging memory that goes back to the OS when dropped.

    An anonymous mapping rather than malloc: glibc keeps freed multi-MiB blocks in per-thread
    arenas once its mmap threshold has grown, which would leave tens of MiB resident per
    reader thread after a load.
    """
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)


#: Bytes of one batched read call (Reader._read_cached): the GIL is released for the whole
#: call, so Ctrl-C and progress reports wait for at most this much of a warm load.
BATCH_BYTES = 64 * MiB
#: Bytes of one step of Reader.fill_many (a run of jobs looked up in the page cache together).
STEP_BYTES = 256 * MiB
# A reader's own values: their boxes, and the source ranges each reads, by key (in order).
_Own = tuple[dict[str, Box], dict[str, list[tuple[str, int, int]]]]
_NUMBERED = re.compile(r"^(.*?\.\d+)\.")


def _position(job: _Job) -> tuple[str, int]:
    """Where in the checkpoint ``job`` starts reading: ``(file, offset)``."""
    item = job.item
    return str(item.source.file), item.source.offset + item.runs[0][0]


def _fill_ranks(keys: Iterable[str]) -> dict[str, int]:
    """Each key's block's place among the blocks (:func:`_fill_group`), in the order the keys
    come: the order in which fills read their bytes and the read-ahead streams go."""
    groups: dict[str, int] = {}
    return {key: groups.setdefault(_fill_group(key), len(groups)) for key in keys}


def _read_ahead_ranks(
    order: list[str], ranges: dict[str, list[tuple[str, int, int]]], room: int | None
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Each key's rank for the read-ahead (lower ranks are read first): its block's place
    among the blocks (:func:`_fill_ranks`), block after block as ``order`` has them. But a
    block of more than ``room`` bytes (far more than the read-ahead's slots hold) whose values' bytes
    interleave in the files (per-expert tensors, which a native model stacks role by role)
    gives each value a rank of its own, in the order their first bytes lie in: read ahead
    as a whole, its slots would fill with the bytes of the values still to come while the
    fills wait for the rest of the one they are in. Also returns, for each block read value
    by value, its roles (the keys past the block's name) in that order. ``room`` None: by
    block only (:meth:`Reader.fill_many`, whose fills go through a block in file order).

    Example:
        >>> ranges = {"l.0.a": [("f", 0, 10), ("f", 20, 10)], "l.0.b": [("f", 10, 10), ("f", 30, 10)],
        ...           "l.1.a": [("f", 40, 10)], "l.1.b": [("f", 50, 10)]}
        >>> _read_ahead_ranks(list(ranges), ranges, 30)
        ({'l.0.a': 0, 'l.0.b': 1, 'l.1.a': 2, 'l.1.b': 2}, {'l.0': ['.a', '.b']})
    """
    blocks: dict[str, list[str]] = {}
    for key in order:
        blocks.setdefault(_fill_group(key), []).append(key)
    ranks: dict[str, int] = {}
    roles: dict[str, list[str]] = {}
    n = 0
    for block, keys in blocks.items():
        runs = sorted((f, o, k) for k in keys for f, o, _ in ranges[k])
        turns = sum(a[2] != b[2] for a, b in zip(runs, runs[1:]))  # k values, each in one run: k - 1
        if room is None or sum(r[2] for k in keys for r in ranges[k]) <= room or turns < len(keys):
            ranks.update(dict.fromkeys(keys, n))
            n += 1
            continue
        keys = sorted(keys, key=lambda k: min(((f, o) for f, o, _ in ranges[k]), default=("", 0)))
        roles[block] = [k[len(block) :] for k in keys]
        for k in keys:
            ranks[k] = n
            n += 1
    return ranks, roles


def _likely_order(ranges: dict[str, list[tuple[str, int, int]]]) -> list[str]:
    """The order ``load_state_dict`` is likely to fill values that read ``ranges`` (by key)
    in: the model's. A release is written in it (``save_pretrained`` goes through the
    model's state dict), so inside a numbered block (:func:`_fill_group`) by where each
    value's first byte lies in the files; the blocks by number (a release may store
    ``layers.10`` before ``layers.2``); other values before the blocks or after them, as
    their bytes lie (``embed_tokens`` first, ``lm_head`` last). Values are often listed in
    another order (sorted by key: ``mlp.down_proj`` before ``self_attn.q_proj``).

    Example:
        >>> _likely_order({"lm_head.weight": [("b", 0, 8)], "model.layers.2.w": [("a", 20, 8)],
        ...                "model.layers.10.w": [("a", 10, 8)], "model.embed.weight": [("a", 0, 8)]})
        ['model.embed.weight', 'model.layers.2.w', 'model.layers.10.w', 'lm_head.weight']
    """
    first = {k: min((f, o) for f, o, _ in r) if r else ("", 0) for k, r in ranges.items()}
    number = {}
    for key in ranges:
        m = _NUMBERED.match(key)
        if m:
            number[key] = int(m.group(1).rsplit(".", 1)[1])
    start = min((first[k] for k in number), default=None)

    def place(key: str) -> tuple[float, tuple[str, int]]:
        if key in number:
            return number[key], first[key]
        return (-math.inf if start is not None and first[key] < start else math.inf), first[key]

    return sorted(ranges, key=place)


def _fill_group(key: str) -> str:
    """What orders ``key``'s bytes among a load's fills: its numbered block (``model.layers.3``)
    or the key itself. Models fill block after block in that order, as the values are listed
    (a release may store ``layers.10`` before ``layers.2``); inside a block their order is
    the module's, not the values' (attention before experts, or after), so a block's bytes go
    in file order: one pass over its region (a release is written in the module's order).

    Example:
        >>> _fill_group("model.layers.3.moe.experts.down_projs"), _fill_group("lm_head.weight")
        ('model.layers.3', 'lm_head.weight')
    """
    m = _NUMBERED.match(key)
    return m.group(1) if m else key


def _wait_all(futures: list[Future[None]]) -> list[BaseException]:
    """Wait for every future; the exceptions they ended with."""
    errors = []
    for fut in futures:
        try:
            fut.result()
        except BaseException as e:  # noqa: BLE001 - returned to the caller, which raises it
            errors.append(e)
    return errors


_READERS: weakref.WeakSet[Reader] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for reader in list(_READERS):
        reader._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class Reader:
    """Fills destinations from a checkpoint; owns the read statistics."""

    def __init__(self, ckpt: Checkpoint, options: ReadOptions | None = None) -> None:
        self.ckpt = ckpt
        self.options = (options or ReadOptions()).resolved(str(ckpt.path))
        ckpt.direct = self.options.direct
        self.stats = Stats()
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []  # staging buffers ready for reuse
        self._pool: ReadPool | None = None
        self.progress: Callable[[Stats, Entry], None] | None = None
        # The values this reader is there to fill, if known (a VirtualStateDict: every key's
        # box on this rank), as entries and boxes; asked once, at the first fill.
        self.own: Callable[[], Iterable[tuple[Entry, Box]]] | None = None
        self._own: _Own | None = None
        self._prefetcher: Prefetcher | None = None  # started by the first cold read of own values
        # Blocks read ahead value by value: their roles in the order assumed, each value's
        # rank, the roles the fills have been in (_learn).
        self._roles: dict[str, list[str]] = {}
        self._ahead_rank: dict[str, int] = {}
        self._visits: dict[str, list[str]] = {}
        self._ahead_of: list[RangeReader] = []  # the files' readers that take bytes from it
        _READERS.add(self)

    def _after_fork(self) -> None:
        """In a child made by ``os.fork``: a lock a parent thread held at the fork would
        never be released here (that thread does not exist); the pool restarts itself, and
        read-ahead streams (the parent's threads) start again if needed."""
        self._lock = threading.Lock()
        self._prefetcher = None

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            for reader in self._ahead_of:
                reader.read_ahead_by(None)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            self._free.clear()  # spare staging buffers go back to the OS

    # ---- planning one fill ---------------------------------------------------------------
    @property
    def shares(self) -> int:
        """How many chunks a plan of a few MiB is cut into (:data:`lazysd.reads.SHARES`
        locally, for the threads; 1 remotely, where each chunk would be a request)."""
        return SHARES if self.ckpt.local else 1

    def plan(self, entry: Entry, box: Box, dest: Destination | None = None) -> tuple[ReadItem, ...]:
        """The read items of filling ``box`` of ``entry`` into ``dest`` (default: a contiguous
        CPU tensor of the entry's dtype), chunked by this reader's options."""
        items = plan_reads(
            entry, box, dest or Destination(entry.dtype), chunk_bytes=self.options.chunk_bytes, shares=self.shares
        )
        if not self.ckpt.local:
            # The transpose kernel reads through a file descriptor: remote bytes are staged
            # (the same runs, into a bounded buffer) and transposed by the copy instead.
            items = tuple(
                replace(i, method="staged", staging=i.data_bytes) if i.method == "fused" else i for i in items
            )
        return items

    def request_count(self, entry: Entry, box: Box, dest: Destination | None = None) -> int:
        """Storage requests :meth:`fill` makes for ``box`` of ``entry``: one per byte run
        locally (a ``pread`` each), the coalesced ranged GETs for a remote checkpoint."""
        reads = []
        for item in self.plan(entry, box, dest):
            reads.append((item.source, item.runs))
            if item.scale is not None:
                reads.append((item.scale.source, item.scale.runs))
        if self.ckpt.local:
            return sum(len(runs) for _, runs in reads)
        from .storage import coalesce

        options = self.ckpt.store.options  # type: ignore[attr-defined]
        return sum(len(coalesce([(info.offset + s, n) for s, n in runs if n], options)) for info, runs in reads)

    def ranges(self, entry: Entry, box: Box, dest: Destination | None = None) -> list[tuple[str, int, int]]:
        """``(file, offset, length)`` of every read :meth:`fill` makes for ``box`` of ``entry``.

        From the read items (:meth:`plan`), FP8 scale blocks included: this is what
        ``bytes_read`` grows by when ``dest`` describes the destination filled.
        """
        return [r for item in self.plan(entry, box, dest) for r in item.ranges()]

    def _order(self, entry: Entry, device: torch.device | str) -> list[int] | None:
        """The memory order :meth:`empty` lays ``entry`` out in, None for native order."""
        return _memory_order(entry) if self.options.mmap and torch.device(device).type == "cpu" else None

    def empty(self, entry: Entry, box: Box, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized tensor for :meth:`fill` of ``box`` of ``entry``.

        Native layout (contiguous) by default. With ``ReadOptions(mmap=True)`` a CPU tensor
        whose sources all share one permutation is laid out in the sources' memory order
        instead, a strided tensor of the native shape: ``gate_and_up_projs`` is then
        ``[E, 2I, D]`` memory seen as ``[E, D, 2I]``, filled by plain reads with no
        transpose, like the mapped ``down_projs`` beside it.
        """
        shape = list(box_shape(box))
        order = self._order(entry, device)
        if order is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty([shape[i] for i in order], dtype=dtype, device=device).permute(inverse_permutation(order))

    def destination(self, entry: Entry, box: Box, dtype: torch.dtype, device: torch.device | str) -> Destination:
        """The :class:`~lazysd.reads.Destination` that :meth:`empty` would allocate: for plans
        of what materializing ``box`` reads, made without allocating it."""
        order = self._order(entry, device)
        stride = None
        if order is not None:
            shape = box_shape(box)
            mem = [shape[i] for i in order]
            mem_stride = [math.prod(mem[j + 1 :]) for j in range(len(mem))]
            native = [0] * len(shape)
            for j, i in enumerate(order):
                native[i] = mem_stride[j]
            stride = tuple(native)
        return Destination(dtype, torch.device(device).type, stride)

    # ---- executing -----------------------------------------------------------------------
    def mapped(self, entry: Entry, box: Box, dtype: torch.dtype) -> torch.Tensor | None:
        """A zero-copy view of ``box`` of ``entry`` in the file mapping, if it needs no conversion.

        Only with ``ReadOptions(mmap=True)``, and only for a whole tensor that is one HF
        tensor, same dtype, no scales — unchanged or permuted (a transposed grouped
        ``down_projs`` is a strided view, as a non-contiguous parameter). The mapping is private
        (copy-on-write): writing to the tensor, e.g. in training, copies the touched pages
        into private memory and never changes the file. Pages are read when first touched,
        so such tensors cost no read and no private memory up front — but a file truncated
        under a mapping faults (SIGBUS) on access instead of raising FileChangedError.
        """
        if not self.options.mmap or len(entry.sources) != 1:
            return None
        src = entry.sources[0]
        info = src.info
        if (
            None in src.dims
            or src.scale is not None
            or info.dtype != dtype
            or tuple(box) != full_box(entry.shape)
            or info.nbytes == 0
        ):
            return None
        t0 = time.perf_counter()
        flat = torch.frombuffer(self.ckpt.mapping(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        view = flat.view(info.dtype).view(info.shape).permute(src.dims)
        self.count_filled(entry, view, t0)  # counted like a filled tensor, so progress reaches its total
        return view

    def _acquire(self, nbytes: int) -> torch.Tensor:
        """A staging buffer of at least ``nbytes``, reused from earlier chunks when possible.

        Reuse spares the page faults of fresh memory for every chunk, which cost as much
        system time as the reads themselves. Buffers in use are bounded by the in-flight
        budget; free ones are kept (a few chunks' worth) until the reader is closed.
        """
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes:
                    return self._free.pop(i)
        return _staging_buffer(max(nbytes, self.options.chunk_bytes))

    def _release(self, buf: torch.Tensor | None) -> None:
        if buf is not None:
            with self._lock:
                self._free.append(buf)

    def _progress(self, job: _Job) -> None:
        """Tell the read-ahead streams where the fills are: at ``job``, about to be read."""
        if self._prefetcher is not None:
            self._prefetcher.consumed(*_position(job))

    def _read(self, job: _Job) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Read one job: ``(staged chunk or None if read in place, pool buffer to release)``."""
        self._progress(job)
        item = job.item
        info = item.source
        if item.method == "fused":
            runs = item.runs
            (start, n), dest = runs[0], job.dest
            offset = info.offset + start
            if self.ckpt.range_reader(info.file).cached(offset, n):
                # Warm: the kernel reads cache-sized blocks and transposes each while in cache.
                self.ckpt.read_with(info, runs, lambda fd: read_transposed(fd, offset, dest))
                return None, None
            # Cold: transposed straight out of the read-ahead's slot where one piece holds
            # it all; else one bulk read into staging (from the read-ahead, else direct:
            # lazysd.pread), as an unchanged tensor's chunk is read, keeps the storage busy,
            # and the transpose from there costs little next to the read.
            if self._lend(job, lambda address: copy_transposed(address, dest)):
                return None, None
            base = self._acquire(n)
            try:
                buf = base[:n].view(info.dtype).view(box_shape(item.source_box))
                self.ckpt.read_runs(info, runs, _as_bytes(buf))
                copy_into(dest, buf.transpose(-1, -2))
            finally:
                self._release(base)
            return None, None
        if item.method == "direct":
            dest = job.dest
            if self._lend(job, lambda address: memmove(dest.data_ptr(), address, item.data_bytes)):
                return None, None
            self.ckpt.read_runs(info, item.runs, _as_bytes(dest))
            return None, None
        base = None
        shape = box_shape(item.source_box)
        if job.dest.device.type == "cuda" and item.scale is None:
            # Pinned, so the host-to-device copy of the staged chunk is a plain DMA.
            buf = torch.empty(shape, dtype=info.dtype, pin_memory=True)
        else:
            n = math.prod(shape) * info.itemsize
            base = self._acquire(n)
            buf = base[:n].view(info.dtype).view(shape)
        try:
            self.ckpt.read_runs(info, item.runs, _as_bytes(buf))
            if item.scale is not None:
                buf = self._dequantize(buf, item)
        except BaseException:
            self._release(base)
            raise
        return buf, base

    def _lend(self, job: _Job, use: Callable[[int], object]) -> bool:
        """Have ``use(address)`` put a cold job's bytes (one run) into place straight out of
        the read-ahead piece that holds them all (:meth:`Prefetcher.lend`), outside its lock
        and with the GIL released; False, with nothing read, where none does. A per-expert
        release's expert then goes into place in one copy, not through staging, and with no
        view made: a cold Qwen3-MoE 2.8 GiB ``load_state_dict`` (1 MiB experts) takes 2.0
        GiB that way and ran 2.35 s against 2.53, its HF-keyed view key by key 2.06 against
        2.55 (medians of 4 and 6, interleaved in one process)."""
        prefetcher, item = self._prefetcher, job.item
        if prefetcher is None or len(item.runs) != 1:
            return False
        info, (start, n) = item.source, item.runs[0]
        file, offset = str(info.file), info.offset + start

        def lent(fds: list[int]) -> list[int]:
            return [n if prefetcher.lend(file, offset, n, use) else 0]

        return self.ckpt.read_batch([(info, item.runs)], lent)[0]

    def _dequantize(self, buf: torch.Tensor, item: ReadItem) -> torch.Tensor:
        """``buf`` (the FP8 rows/cols of ``item``) decoded with the scale blocks the item names."""
        scale = item.scale
        assert scale is not None
        s = torch.empty(box_shape(scale.box), dtype=scale.source.dtype)
        self.ckpt.read_runs(scale.source, scale.runs, _as_bytes(s))
        return dequantize(buf, item.source_box, s, scale.box, scale.block)

    def _place(self, job: _Job, buf: torch.Tensor) -> None:
        if job.dest.device.type != "cpu":
            # Ship the contiguous staging buffer, permute on the device (fast there).
            staged = buf if not torch.cuda.is_available() or buf.is_pinned() else buf.pin_memory()
            buf = staged.to(job.dest.device, non_blocking=True)
        copy_into(job.dest, to_native(buf, job.item.dims))

    def _staging(self, delta: int) -> None:
        with self._lock:
            self.stats.staging_live += delta
            self.stats.staging_peak = max(self.stats.staging_peak, self.stats.staging_live)

    def fill(self, entry: Entry, box: Box, dest: torch.Tensor, *, fresh: bool = False) -> torch.Tensor:
        """Write the ``box`` of native tensor ``entry`` into ``dest`` (shape of the box).

        ``fresh``: ``dest`` was just allocated: its pages are mapped in one call before the reads.
        """
        _check_shape(entry, box, dest)
        t0 = time.perf_counter()
        if fresh:
            populate(dest)  # one call maps every page, instead of a fault per page during the reads
        jobs = [_Job(item, dest) for item in self.plan(entry, box, Destination.of(dest))]
        # In file order: a stacked value's sources go gate, up, gate, up (not every gate, then
        # every up), so each piece read ahead is copied out whole while its slot is held.
        # One source's items are in its row order, file order already.
        if len(jobs) > 1 and jobs[0].item.source is not jobs[-1].item.source:
            jobs.sort(key=_position)
        if self._roles:
            self._learn(entry.key)
        self._run(jobs, lambda: self._all_own([(entry, box)]))
        self.count_filled(entry, dest, t0)
        return dest

    def fill_many(self, fills: Iterable[tuple[Entry, Box, torch.Tensor]]) -> None:
        """:meth:`fill` each ``(entry, box, dest)``, all through one pipeline.

        One tensor after another, the reader threads wait at the end of every tensor and a
        small tensor is read by one thread alone; here the chunks of all of them share the
        threads, block after block (:func:`_fill_ranks`) in the order the fills are given
        (the order the read-ahead streams go), in file order within a block. Each
        destination counts as filled (stats, progress) when its last chunk is in.

        Example:
            >>> reader.fill_many((vsd.entry(k), full_box(t.shape), t) for k, t in dests.items())  # doctest: +SKIP
        """
        planned = []
        for entry, box, dest in fills:
            _check_shape(entry, box, dest)
            items = self.plan(entry, box, Destination.of(dest))
            planned.append((_Fill(entry, dest, time.perf_counter(), len(items)), items, box))
        jobs = []
        for fill, items, _ in planned:
            if not items:
                self.count_filled(fill.entry, fill.dest, fill.t0)
            jobs += [_Job(item, fill.dest, fill) for item in items]
        rank = _fill_ranks(fill.entry.key for fill, _, _ in planned)
        jobs.sort(key=lambda job: (rank[job.fill.entry.key], *_position(job)))
        own = functools.cache(lambda: self._all_own([(fill.entry, box) for fill, _, box in planned]))
        # In steps of STEP_BYTES: each step's cached bytes are sought when its turn comes (a
        # checkpoint partly in the page cache), the rest read cold.
        step, size = [], 0
        for job in jobs:
            step.append(job)
            size += job.item.data_bytes
            if size >= STEP_BYTES:
                self._run(step, own)
                step, size = [], 0
        self._run(step, own)

    def _all_own(self, fills: list[tuple[Entry, Box]]) -> list[str] | None:
        """The keys of the fills of ``(entry, box)`` if every one is one of this reader's own
        values (:attr:`own`), else None.

        A VirtualStateDict's values are read one tensor at a time (``load_state_dict``),
        each plan knowing only its own bytes; every key's box on this rank is this rank's to
        read, so a cold read of one of them may start reading the others ahead
        (:meth:`_prefetch`), never a byte that is not (another rank's experts, tensors the
        plan does not use). Other regions (a slice, a box given to
        :meth:`~lazysd.VirtualStateDict.lazy`) start nothing: their neighbours may never be
        read.
        """
        own = self._own_values()
        if own is None or any(own[0].get(entry.key) != tuple(box) for entry, box in fills):
            return None
        return [entry.key for entry, _ in fills]

    def _own_values(self) -> _Own | None:
        """This reader's own values' boxes, and the source ranges each reads
        (:func:`lazysd.reads.source_ranges`), by key in the values' order; None where they
        are not known."""
        if self.own is None or not self.ckpt.local:
            return None
        if self._own is None:
            own = list(self.own())
            self._own = {e.key: b for e, b in own}, {e.key: source_ranges(e, b) for e, b in own}
        return self._own

    def _prefetch(self, at: tuple[str, int], keys: list[str]) -> None:
        """At the first cold read of this reader's own values (at ``(file, offset)``): read
        the whole pages of their blocks ahead, on several streams (:mod:`lazysd.prefetch`),
        block after block in the order of ``keys`` (the values being filled: all of them for
        :meth:`fill_many`, one for ``load_state_dict``) and then in the order the others are
        likely filled in (:func:`_likely_order`), each block in file order, or value by
        value where it is too large for the slots (:func:`_read_ahead_ranks`); and have the
        files' reads take those bytes from them."""
        own = self._own_values()
        if self._prefetcher is not None or own is None or not self.options.direct:
            return
        ranges = own[1]
        rest = _likely_order(ranges) if len(keys) < len(ranges) else list(ranges)
        order = list(dict.fromkeys([k for k in keys if k in ranges] + rest))
        largest = max(sum(n for _, _, n in r) for r in ranges.values())
        # Where the fills go through a block in another order than the file's, the slots may
        # grow to what the memory bound (1.25x the largest value + 64 MiB) leaves once the
        # staging is set aside: a Qwen3-MoE benchmark layer (196 MiB, its largest value 128)
        # then fits all but one piece.
        most = (int(1.25 * largest) + 64 * MiB - self.options.max_inflight_bytes) // PIECE
        # One value at a time (load_state_dict), a block more than twice what the slots may
        # hold is read ahead value by value; one that nearly fits is read faster whole (the
        # benchmark's Qwen3-MoE layers, 196 MiB in 192 MiB of slots: 0.51-0.55 s cold for 0.9
        # GiB, against 0.60-0.66 value by value). fill_many reads a block in file order.
        room = 2 * min(MOST, max(SLOTS, most)) * PIECE if len(keys) == 1 else None
        rank, self._roles = _read_ahead_ranks(order, ranges, room)
        self._ahead_rank, self._visits = rank, {}
        uses = [(rank[k], *r) for k in order for r in ranges[k]]
        files = {f for f in {f for _, f, _, _ in uses} if self.ckpt.range_reader(Path(f)).direct()}
        windows = [w for w in rank_windows(uses) if w[0] in files]
        # Only the files with bytes to read ahead ask the read-ahead for them.
        readers = {f: self.ckpt.range_reader(Path(f)) for f, _, _ in windows}
        if windows:
            # Direct reads, and probes of the page cache with readahead off: both exact.
            open_fd = lambda file, flags: self.ckpt.range_reader(Path(file)).reopen(flags, random=not flags)  # noqa: E731
            # In the order of the fills (uses), which need not be the files' (lm_head stored
            # last, layer 10 stored before layer 2).
            edges = shared_pages([u for u in uses if u[1] in files], windows)
            self._prefetcher = prefetcher = Prefetcher(windows, open_fd, at=at, uses=uses, most=most, edges=edges)
            for file, reader in readers.items():
                reader.read_ahead_by(functools.partial(prefetcher.serve, file))
            self._ahead_of = list(readers.values())

    def _learn(self, key: str) -> None:
        """A fill of ``key`` starts: where its block is read ahead value by value
        (:func:`_read_ahead_ranks`) and the fills go through its values in another order than
        guessed (a model that registers ``down_projs`` before ``gate_and_up_projs``), the
        blocks no fill has come to yet are read ahead in the order seen (the model's)."""
        block = _fill_group(key)
        roles, role, prefetcher = self._roles.get(block), key[len(block) :], self._prefetcher
        if roles is None or role not in roles or prefetcher is None:
            return
        with self._lock:  # fills may run on several threads at once
            seen = self._visits.setdefault(block, [])
            if role in seen:
                return
            seen.append(role)
            learned = seen + [r for r in roles if r not in seen]
            if learned == roles:
                return
            self._roles[block] = learned
            ranks: dict[float, float] = {}
            for other, theirs in self._roles.items():
                if other in self._visits or sorted(theirs) != sorted(learned):
                    continue
                places = sorted(self._ahead_rank[other + r] for r in theirs)
                moved = {other + r: place for r, place in zip(learned, places)}
                ranks.update({self._ahead_rank[k]: place for k, place in moved.items()})
                self._ahead_rank.update(moved)
                self._roles[other] = learned
        prefetcher.rerank(ranks)

    def count_filled(self, entry: Entry, out: torch.Tensor, t0: float) -> None:
        """Count ``out`` as a destination of ``entry`` filled since ``t0`` (stats, progress),
        also where its bytes came from elsewhere (another rank of the node)."""
        with self._lock:
            self.stats.tensors += 1
            self.stats.bytes_out += out.numel() * out.element_size()
            self.stats.seconds += time.perf_counter() - t0
        if self.progress is not None:
            self.progress(self.stats, entry)

    def _finish(self, job: _Job, read: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        """Put a read chunk in place (unless it was read in place) and free its buffer."""
        buf, base = read
        try:
            if buf is not None:
                self._place(job, buf)
        finally:
            self._release(base)
        self._done(job)

    def _done(self, job: _Job) -> None:
        fill = job.fill
        if fill is not None:
            with self._lock:  # jobs of one fill may finish on several threads (_run_shared)
                fill.left -= 1
                done = fill.left == 0
            if done:
                self.count_filled(fill.entry, fill.dest, fill.t0)

    def _run_inline(self, job: _Job) -> None:
        cost = job.item.staging
        self._staging(cost)
        try:
            self._finish(job, self._read(job))
        finally:
            self._staging(-cost)

    def _run(self, jobs: list[_Job], own: Callable[[], list[str] | None] | None = None) -> None:
        """Carry out ``jobs``: those of cached bytes in batched kernel calls, the rest (cold)
        job by job; where ``own()`` says they are this reader's own values (the keys in fill
        order), the first cold ones start the read-ahead of all of them (:meth:`_prefetch`)."""
        if not jobs:
            return
        jobs = self._read_cached(jobs)
        if not jobs:
            return
        if self._prefetcher is None and own is not None and (keys := own()) is not None and self._cold(jobs[0]):
            self._prefetch(_position(jobs[0]), keys)  # the first cold read of this reader's own values
        if self.options.threads <= 0 or len(jobs) <= 1:
            for job in jobs:
                self._run_inline(job)
        elif any(job.item.method == "staged" for job in jobs):
            self._run_pipelined(jobs)
        else:
            self._run_shared(jobs)

    def _cold(self, job: _Job) -> bool:
        """Whether ``job``'s bytes are not in the page cache. The jobs the batched reads leave
        are cold, or staged (casts, other devices), which they never read: warm, those would
        have the read-ahead copy page-cache bytes into its slots, and the fills copy them
        again, one at a time under its lock (CUDA destinations: every job is staged; a warm
        3.7 GiB Step3p5 load into an H200 took 1.11 s that way, 0.46 s without)."""
        file, pos = _position(job)
        return not self.ckpt.range_reader(Path(file)).cached(pos, job.item.runs[0][1])

    def _read_cached(self, jobs: list[_Job]) -> list[_Job]:
        """Read the direct and fused jobs whose bytes are in the page cache with the kernel's
        batched reads (:func:`lazysd.transpose.read_many`): the GIL released once per
        :data:`BATCH_BYTES`, every thread busy to the end of the batch; returns the jobs
        left for the per-job paths below: cold ones (read in bulk), and any that came up
        short (read again there, which reports the file and key).

        A job is a few MiB or less; run one by one from Python, each took a worker hand-off
        and GIL hand-offs between the threads, which on a small VM cost more than splitting
        a 1-2 MiB tensor over two threads saved.
        """
        if not (kernel_available() and self.ckpt.local):
            return jobs
        left: list[_Job] = []
        batch: list[_Job] = []
        size = 0
        for job in jobs:
            item = job.item
            if item.method == "staged" or len(item.runs) != 1:
                left.append(job)
                continue
            batch.append(job)
            size += item.runs[0][1]
            if size >= BATCH_BYTES:
                left += self._read_batch(batch)
                batch, size = [], 0
        return left + self._read_batch(batch) if batch else left

    def _read_batch(self, jobs: list[_Job]) -> list[_Job]:
        """One call of the batched reads for ``jobs`` (direct and fused, one run each); the
        jobs it did not read in full."""
        self._progress(jobs[0])
        reads = [(job.item.source, job.item.runs) for job in jobs]

        def run(fds: list[int]) -> list[int]:
            batch = [job.kernel_job(fd) for fd, job in zip(fds, jobs)]
            return read_many(batch, max(1, self.options.threads), probe=self.options.direct)

        left = []
        for job, done in zip(jobs, self.ckpt.read_batch(reads, run), strict=True):
            if done:
                self._done(job)
            else:
                left.append(job)
        return left

    def _get_pool(self) -> ReadPool:
        with self._lock:  # fills may run on several threads at once (remote loads)
            if self._pool is None:
                self._pool = ReadPool(self.options.threads)
            return self._pool

    def _run_shared(self, jobs: list[_Job]) -> None:
        """Jobs that write their destination themselves (direct and fused reads): the calling
        thread and ``threads - 1`` pool workers take them off one list until it is empty.

        No copies are left for the calling thread to make, so it reads like any worker, and
        ``threads`` threads in all run (as many as cores by default: reads of cached bytes
        and transposes are CPU work, and a thread more only contends). A fill of a few
        chunks costs one hand-off per worker, not one per chunk. A cold fused chunk is the
        only job that stages (one per worker at a time), so the workers are as many as
        ``max_inflight_bytes`` holds such chunks.
        """
        todo = iter(jobs)  # a list iterator: next() is atomic under the GIL, each job is taken once
        stop = threading.Event()

        def drain() -> None:
            for job in todo:
                if stop.is_set():
                    return
                try:
                    self._run_inline(job)
                except BaseException:
                    stop.set()  # the others finish their current job and leave
                    raise

        # A cold fused chunk stages its bytes: no more workers than the in-flight budget holds.
        most = max(job.item.staging for job in jobs)
        workers = min(self.options.threads, len(jobs), max(1, self.options.max_inflight_bytes // max(1, most)))
        pool = self._get_pool()
        helpers = [pool.submit(drain) for _ in range(workers - 1)]
        try:
            drain()
        except BaseException:
            stop.set()
            _wait_all(helpers)  # no thread writes into the destinations once we leave
            raise
        errors = _wait_all(helpers)
        if errors:
            raise errors[0]

    def _run_pipelined(self, jobs: list[_Job]) -> None:
        """Reads on the pool, ahead of the copies; copies (and casts) on the calling thread.

        The copies run where torch's intra-op threads can split them over the cores, while
        the pool's preads (which release the GIL) keep the next chunks coming. While the
        oldest read is still running, the calling thread takes the next job itself rather
        than wait: a fill of a few chunks then ends with every thread busy to the last one.
        """
        pool = self._get_pool()
        pending: deque[tuple[_Job, Future[tuple[torch.Tensor | None, torch.Tensor | None]], int]] = deque()
        inflight = 0
        budget = self.options.max_inflight_bytes
        todo = deque(jobs)
        try:
            while todo or pending:
                # Backpressure: start reads only while their staging fits the budget
                # (one read is always allowed, so a single large row still makes progress).
                while todo and len(pending) < 2 * self.options.threads:
                    cost = todo[0].item.staging
                    if pending and inflight + cost > budget:
                        break
                    job = todo.popleft()
                    inflight += cost
                    self._staging(cost)
                    pending.append((job, pool.submit(self._read, job), cost))
                if todo and not pending[0][1].done() and inflight + todo[0].item.staging <= budget:
                    job = todo.popleft()
                    inflight += job.item.staging
                    try:
                        self._run_inline(job)
                    finally:
                        inflight -= job.item.staging
                    continue
                job, fut, cost = pending.popleft()
                try:
                    self._finish(job, fut.result())
                finally:
                    inflight -= cost
                    self._staging(-cost)
        finally:
            # An error or an interrupt: cancel reads not started, let started ones finish
            # (one bounded read each) and free their budget. A second Ctrl-C here leaves at
            # once; the workers are daemon threads that never block the interpreter's exit.
            for _, fut, _cost in pending:
                fut.cancel()
            for _, fut, cost in pending:
                try:
                    self._release(fut.result()[1])
                except Exception:
                    pass
                self._staging(-cost)
