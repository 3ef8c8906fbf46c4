"""Execute a plan entry: read exactly the planned bytes and write them into a destination.

:func:`Reader.fill` takes a native :class:`~lazysd.plan.Entry`, a box of it (the whole tensor,
or one rank's shard) and a destination tensor of the box's shape. For each source block the
box overlaps it reads the overlapping source rows with ``pread`` in one of three ways:
straight into the destination where its memory is in source order (no permutation, no cast);
through the transpose kernel, which reads cache-sized blocks and transposes them into the
destination (expert weights, :mod:`lazysd.transpose`); else into a bounded staging buffer
then copied into a view of the destination (casts, FP8 dequantization, other devices). No
full-size temporary is built, and each HF byte is read once.

Reads run on a small thread pool ahead of the copies, but never more than
``max_inflight_bytes`` of staging ahead: that is the memory bound of a load.
"""

from __future__ import annotations

import math
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import Checkpoint, TensorInfo
from .plan import Box, Entry, Source, local_box
from .transpose import copy_into, fused_read_applies, read_transposed

MiB = 1 << 20
_FUSED_BLOCK = 256 << 10  # the kernel's block buffer (BLOCK_BYTES in _transpose.c)
_DIRECT_ROW = 64 << 10  # smallest row read on its own rather than staged with its neighbours


@dataclass(frozen=True)
class ReadOptions:
    """How reads are carried out (keyword options of :class:`~lazysd.VirtualStateDict`).

    Attributes:
        threads: reader threads; 0 reads on the calling thread.
        chunk_bytes: target size of one read (source rows are never split).
        max_inflight_bytes: staging memory that reads may run ahead of copies.
        mmap: materialize tensors that need no conversion as copy-on-write views of the
            file mapping instead of reading them (see :meth:`Reader.mapped`).
    """

    threads: int = 2
    chunk_bytes: int = 8 * MiB
    max_inflight_bytes: int = 32 * MiB
    mmap: bool = False


@dataclass
class Stats:
    """Counters of one VirtualStateDict's reads, for reports and tests."""

    tensors: int = 0  # destinations filled
    bytes_out: int = 0  # bytes written into destinations
    staging_live: int = 0  # staging bytes allocated now
    staging_peak: int = 0  # most staging bytes ever allocated at once
    seconds: float = 0.0  # time spent in fill()


@dataclass(frozen=True)
class _Job:
    """Read one chunk of one source and put it in place."""

    info: TensorInfo
    runs: list[tuple[int, int]]  # (byte offset in tensor, length)
    src_shape: tuple[int, ...]  # shape of the chunk as read, in source order
    dest: torch.Tensor  # destination view, native order
    dims: tuple[int | None, ...]
    direct: bool  # read straight into dest (then the destination seen in source order)
    # Read and transposed by the kernel in cache-sized blocks (dest is then the view with
    # the new axes of dims dropped); staging is the kernel's block buffer.
    fused: bool
    staging: int  # staging bytes this job holds while in flight
    # FP8 chunk: (its source, the chunk's box in source coordinates); the reader reads the
    # scale blocks covering that box and returns the chunk dequantized (fp32).
    scaled: tuple[Source, list[tuple[int, int]]] | None = None


def _runs(shape: tuple[int, ...], itemsize: int, box: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) of a row-major tensor's sub-box, in order, merged."""
    ndim = len(shape)
    strides = [itemsize * math.prod(shape[i + 1 :]) for i in range(ndim)]
    # Innermost dims that are complete make one contiguous run with the first partial dim.
    k = ndim - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    run_len = (box[k][1] - box[k][0]) * strides[k] if ndim else itemsize
    if ndim == 0:
        return [(0, itemsize)]
    base = box[k][0] * strides[k]
    starts = np.array([base], dtype=np.int64)
    for d in range(k - 1, -1, -1):
        idx = np.arange(box[d][0], box[d][1], dtype=np.int64) * strides[d]
        starts = (idx[:, None] + starts[None, :]).reshape(-1)
    if len(starts) == 1:
        return [(int(starts[0]), run_len)]
    merged: list[tuple[int, int]] = []
    for s in starts.tolist():
        if merged and merged[-1][0] + merged[-1][1] == s:
            merged[-1] = (merged[-1][0], merged[-1][1] + run_len)
        else:
            merged.append((s, run_len))
    return merged


def source_box(src: Source, box: Box) -> tuple[list[tuple[int, int]], tuple[list[int], list[int]]] | None:
    """The sub-box of HF tensor ``src.info`` that native ``box`` needs, or None if they miss.

    Returns ``(src_box, (lo, hi))``: the box in source dimension order (what is read, through
    :func:`_runs`), and the overlap in native coordinates (where it lands). Pure: the reader
    and the dry-run plans of :mod:`lazysd.inspect` share it, so a plan is what a read reads.
    """
    lo = [max(b[0], s) for b, s in zip(box, src.start)]
    hi = [min(b[1], s + e) for b, s, e in zip(box, src.start, src.extent)]
    if any(l >= h for l, h in zip(lo, hi)):
        return None
    src_box: list[tuple[int, int]] = [(0, 1)] * len(src.info.shape)
    for i, d in enumerate(src.dims):
        if d is not None:
            src_box[d] = (lo[i] - src.start[i], hi[i] - src.start[i])
    return src_box, (lo, hi)


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


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


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


def _scale_blocks(src: Source, sub: list[tuple[int, int]]) -> tuple[TensorInfo, list[tuple[int, int]]]:
    """The FP8 scale tensor of ``src`` and the block rows/columns that rows/cols ``sub`` touch."""
    scale, (b0, b1) = src.scale, src.block
    assert scale is not None
    (r0, r1), (c0, c1) = sub
    return scale, [(r0 // b0, -(-r1 // b0)), (c0 // b1, -(-c1 // b1))]


def _staging_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-aligned staging memory that goes back to the OS when dropped.

    An anonymous mapping rather than malloc: glibc keeps freed multi-MiB blocks in per-thread
    arenas once its mmap threshold has grown, which would leave tens of MiB resident per
    reader thread after a load.
    """
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)


class Reader:
    """Fills destinations from a checkpoint; owns the read statistics."""

    def __init__(self, ckpt: Checkpoint, options: ReadOptions | None = None) -> None:
        self.ckpt = ckpt
        self.options = options or ReadOptions()
        self.stats = Stats()
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []  # staging buffers ready for reuse
        self._pool: ThreadPoolExecutor | None = None
        self.progress: Callable[[Stats, Entry], None] | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            self._free.clear()  # spare staging buffers go back to the OS

    # ---- planning one fill ---------------------------------------------------------------
    def ranges(self, entry: Entry, box: Box) -> list[tuple[str, int, int]]:
        """``(file, offset, length)`` of every read :meth:`fill` makes for ``box`` of ``entry``.

        Planned like a real fill (against a meta destination, so nothing is allocated or
        read), FP8 scale blocks included: this is what ``bytes_read`` grows by.
        """
        dest = torch.empty([h - l for l, h in box], dtype=entry.dtype, device="meta")
        out: list[tuple[str, int, int]] = []
        for job in self._jobs(entry, box, dest):
            out += [(str(job.info.file), job.info.offset + start, n) for start, n in job.runs]
            if job.scaled is not None:
                scale, blocks = _scale_blocks(*job.scaled)
                out += [(str(scale.file), scale.offset + start, n) for start, n in _runs(scale.shape, scale.itemsize, blocks)]
        return out

    def request_count(self, entry: Entry, box: Box) -> int:
        """Storage requests :meth:`fill` makes for ``box`` of ``entry``: one per byte run
        locally (a ``pread`` each), coalesced ranged GETs for a remote checkpoint."""
        dest = torch.empty([h - l for l, h in box], dtype=entry.dtype, device="meta")
        reads: list[tuple[TensorInfo, list[tuple[int, int]]]] = []
        for job in self._jobs(entry, box, dest):
            reads.append((job.info, job.runs))
            if job.scaled is not None:
                scale, blocks = _scale_blocks(*job.scaled)
                reads.append((scale, _runs(scale.shape, scale.itemsize, blocks)))
        if self.ckpt.local:
            return sum(len(runs) for _, runs in reads)
        from .storage import coalesce

        options = self.ckpt.store.options  # type: ignore[attr-defined]
        return sum(len(coalesce([(info.offset + s, n) for s, n in runs if n], options)) for info, runs in reads)

    def _jobs(self, entry: Entry, box: Box, dest: torch.Tensor) -> list[_Job]:
        jobs: list[_Job] = []
        for src in entry.sources:
            jobs.extend(self._source_jobs(src, box, dest))
        return jobs

    def _source_jobs(self, src: Source, box: Box, dest: torch.Tensor) -> list[_Job]:
        overlap = source_box(src, box)
        if overlap is None:
            return []
        src_box, (lo, hi) = overlap
        info = src.info
        view = dest[tuple(slice(l - b[0], h - b[0]) for l, h, b in zip(lo, hi, box))]
        perm = [d for d in src.dims if d is not None]
        new_axes = tuple(0 if d is None else slice(None) for d in src.dims)
        # The destination seen in source order: where that is contiguous, the bytes can be
        # read straight into it (unchanged tensors; halves of a tensor laid out in source
        # order, see empty()).
        as_source = view[new_axes].permute(_inverse(perm))
        plain = src.scale is None and dest.dtype == info.dtype and dest.device.type == "cpu"
        if not info.shape:
            target, staging = (as_source, 0) if plain else (view, info.itemsize)
            return [_Job(info, [(0, info.itemsize)], (), target, src.dims, direct=plain, fused=False, staging=staging)]
        rows = src_box[0][1] - src_box[0][0]
        # A dequantized chunk is staged in fp32: budget its rows at that size.
        row_bytes = (4 if src.scale is not None else info.itemsize) * math.prod(h - l for l, h in src_box[1:])
        per = max(1, self.options.chunk_bytes // max(1, row_bytes))
        if plain and row_bytes >= _DIRECT_ROW and not as_source.is_contiguous() and as_source[:1].is_contiguous():
            per = 1  # contiguous row by row only: one direct read per row beats staging
        # The kernel's case: the last two source dims swapped, nothing else moved, no cast.
        swapped = (
            plain
            and self.ckpt.local  # the kernel reads through a file descriptor
            and perm == [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]
            and len(perm) in (2, 3)
            and src_box[-1] == (0, info.shape[-1])
        )
        native0 = src.dims.index(0)
        jobs = []
        for r in range(0, rows, per):
            n = min(per, rows - r)
            sub = [(src_box[0][0] + r, src_box[0][0] + r + n), *src_box[1:]]
            runs = _runs(info.shape, info.itemsize, sub)
            chunk_view = view.narrow(native0, r, n)
            chunk_source = as_source.narrow(0, r, n)
            shape = tuple(h - l for l, h in sub)
            scaled = (src, sub) if src.scale is not None else None
            common = (info, runs, shape)
            if plain and chunk_source.is_contiguous():
                job = _Job(*common, chunk_source, src.dims, direct=True, fused=False, staging=0)
            elif swapped and len(runs) == 1 and fused_read_applies(chunk_view[new_axes]):
                staging = min(n * row_bytes, max(_FUSED_BLOCK, 8 * info.shape[-1] * info.itemsize))
                job = _Job(*common, chunk_view[new_axes], src.dims, direct=False, fused=True, staging=staging)
            else:
                job = _Job(*common, chunk_view, src.dims, direct=False, fused=False, staging=n * row_bytes, scaled=scaled)
            jobs.append(job)
        return jobs

    def empty(self, entry: Entry, box: Box, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialized tensor for :meth:`fill` of ``box`` of ``entry``.

        Native layout (contiguous) by default. With ``ReadOptions(mmap=True)`` a CPU tensor
        whose sources all share one permutation is laid out in the sources' memory order
        instead, a strided tensor of the native shape: ``gate_and_up_projs`` is then
        ``[E, 2I, D]`` memory seen as ``[E, D, 2I]``, filled by plain reads with no
        transpose, like the mapped ``down_projs`` beside it.
        """
        shape = [h - l for l, h in box]
        order = _memory_order(entry) if self.options.mmap and torch.device(device).type == "cpu" else None
        if order is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty([shape[i] for i in order], dtype=dtype, device=device).permute(_inverse(order))

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
            or tuple(box) != local_box(entry.shape)
            or info.nbytes == 0
        ):
            return None
        t0 = time.perf_counter()
        flat = torch.frombuffer(self.ckpt.mapping(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        view = flat.view(info.dtype).view(info.shape).permute(src.dims)
        self._done(entry, view, t0)  # counted like a filled tensor, so progress reaches its total
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

    def _read(self, job: _Job) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Read one job: ``(staged chunk or None if read in place, pool buffer to release)``."""
        if job.fused:
            offset, dest = job.info.offset + job.runs[0][0], job.dest
            self.ckpt.read_with(job.info, job.runs, lambda fd: read_transposed(fd, offset, dest))
            return None, None
        if job.direct:
            self.ckpt.read_runs(job.info, job.runs, _as_bytes(job.dest))
            return None, None
        base = None
        if job.dest.device.type == "cuda" and job.scaled is None:
            # Pinned, so the host-to-device copy of the staged chunk is a plain DMA.
            buf = torch.empty(job.src_shape, dtype=job.info.dtype, pin_memory=True)
        else:
            n = math.prod(job.src_shape) * job.info.itemsize
            base = self._acquire(n)
            buf = base[:n].view(job.info.dtype).view(job.src_shape)
        try:
            self.ckpt.read_runs(job.info, job.runs, _as_bytes(buf))
            if job.scaled is not None:
                buf = self._dequantize(buf, *job.scaled)
        except BaseException:
            self._release(base)
            raise
        return buf, base

    def _dequantize(self, buf: torch.Tensor, src: Source, sub: list[tuple[int, int]]) -> torch.Tensor:
        """``buf`` (FP8 rows/cols ``sub`` of ``src``) times its inverse block scales, in fp32.

        Reads only the scale blocks that ``sub`` touches: block rows
        ``[r0 // b0, ceil(r1 / b0))`` and likewise for columns (edges may be ragged).
        """
        scale, blocks = _scale_blocks(src, sub)
        (b0, b1), (r0, r1), (c0, c1) = src.block, *sub
        s = torch.empty(tuple(h - l for l, h in blocks), dtype=scale.dtype)
        self.ckpt.read_runs(scale, _runs(scale.shape, scale.itemsize, blocks), _as_bytes(s))
        s = s.float().repeat_interleave(b0, 0).repeat_interleave(b1, 1)
        s = s[r0 - blocks[0][0] * b0 : r1 - blocks[0][0] * b0, c0 - blocks[1][0] * b1 : c1 - blocks[1][0] * b1]
        return buf.float().mul_(s)

    def _place(self, job: _Job, buf: torch.Tensor) -> None:
        if job.dest.device.type != "cpu":
            # Ship the contiguous staging buffer, permute on the device (fast there).
            staged = buf if not torch.cuda.is_available() or buf.is_pinned() else buf.pin_memory()
            buf = staged.to(job.dest.device, non_blocking=True)
        copy_into(job.dest, to_native(buf, job.dims))

    def _staging(self, delta: int) -> None:
        with self._lock:
            self.stats.staging_live += delta
            self.stats.staging_peak = max(self.stats.staging_peak, self.stats.staging_live)

    def fill(self, entry: Entry, box: Box, dest: torch.Tensor) -> torch.Tensor:
        """Write the ``box`` of native tensor ``entry`` into ``dest`` (shape of the box)."""
        expected = tuple(h - l for l, h in box)
        if tuple(dest.shape) != expected:
            raise ValueError(f"{entry.key}: destination shape {list(dest.shape)} is not the requested box {list(expected)}")
        t0 = time.perf_counter()
        jobs = self._jobs(entry, box, dest)
        opts = self.options
        if opts.threads <= 0 or len(jobs) <= 1:
            for job in jobs:
                self._run_inline(job)
        else:
            self._run_pipelined(jobs)
        self._done(entry, dest, t0)
        return dest

    def _done(self, entry: Entry, out: torch.Tensor, t0: float) -> None:
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

    def _run_inline(self, job: _Job) -> None:
        cost = job.staging
        self._staging(cost)
        try:
            self._finish(job, self._read(job))
        finally:
            self._staging(-cost)

    def _run_pipelined(self, jobs: list[_Job]) -> None:
        """Reads on the pool, ahead of the copies; copies (and casts) on the calling thread.

        The copies run where torch's intra-op threads can split them over the cores, while
        the pool's preads (which release the GIL) keep the next chunks coming.
        """
        with self._lock:  # fills may run on several threads at once (remote loads)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.options.threads, thread_name_prefix="lazysd-read")
        pending: deque[tuple[_Job, Future[tuple[torch.Tensor | None, torch.Tensor | None]], int]] = deque()
        inflight = 0
        budget = self.options.max_inflight_bytes
        todo = deque(jobs)
        try:
            while todo or pending:
                # Backpressure: start reads only while their staging fits the budget
                # (one read is always allowed, so a single large row still makes progress).
                while todo and len(pending) < 2 * self.options.threads:
                    cost = todo[0].staging
                    if pending and inflight + cost > budget:
                        break
                    job = todo.popleft()
                    inflight += cost
                    self._staging(cost)
                    pending.append((job, self._pool.submit(self._read, job), cost))
                job, fut, cost = pending.popleft()
                try:
                    self._finish(job, fut.result())
                finally:
                    inflight -= cost
                    self._staging(-cost)
        finally:
            for _, fut, cost in pending:  # an error: let started reads finish, free their budget
                fut.cancel()
                try:
                    self._release(fut.result()[1])
                except Exception:
                    pass
                self._staging(-cost)
