"""The byte-level read plan: which bytes, from where, into which region. Pure.

:func:`plan_reads` turns a native tensor's plan :class:`~lazysd.plan.Entry`, a box of it (the
whole tensor, or one rank's shard) and a description of the destination into a tuple of
:class:`ReadItem` s: plain frozen data, one per chunk of source rows, each naming the source
tensor (file, key, data offset, dtype, shape), the region of it to read (a box in the
source's own dims, whose row-major byte runs are :attr:`ReadItem.runs`), the region of the
destination it fills (:attr:`ReadItem.dest_box`, relative to the destination's first element)
and, for block-scaled FP8 weights, the scale blocks to multiply in (:class:`ScaleRead`).

This is lazysd's counterpart of torch.distributed.checkpoint's ``ReadItem`` (dest offsets,
storage offsets, lengths, as data): the reader (:mod:`lazysd.reader`) only carries items out,
and everything that needs to know what a load reads derives from the same items:
``VirtualStateDict.planned_ranges``, the dry-run plans and ``explain`` of
:mod:`lazysd.inspect`, and the progress total. :func:`read_totals` counts the same chunks
without building items, for plans with many ranks or very many runs.

Each item also says how the reader carries it out (:attr:`ReadItem.method`), since that
decides the chunking: ``"direct"`` reads straight into the destination (its memory is in
source order: no permutation, no cast, CPU); ``"fused"`` reads through the transpose kernel
into a destination whose last two dims are the source's swapped; ``"staged"`` reads into a
bounded staging buffer, then converts (cast, FP8 dequantization, permutation, another device).

Consumers outside the reader (a DCP storage reader, remote ranged reads) need only
:attr:`ReadItem.source` (``file``, ``offset``) and :meth:`ReadItem.ranges`: absolute
``(file offset, length)`` pairs, the source-order bytes of the item back to back.

Example:
    >>> from lazysd.testing import make_checkpoint, Step3p5Spec   # doctest: +SKIP
    >>> vsd = VirtualStateDict(path)                              # doctest: +SKIP
    >>> entry = vsd.entry("model.layers.3.moe.experts.down_projs")  # doctest: +SKIP
    >>> items = plan_reads(entry, ((0, 2), *full_box(entry.shape)[1:]), Destination(torch.bfloat16))  # doctest: +SKIP
    >>> items[0].source.key, items[0].source_box, items[0].dest_box  # doctest: +SKIP
    ('model.layers.3.moe.down_proj.weight', ((0, 1), (0, 16), (0, 8)), ((0, 1), (0, 8), (0, 16)))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from .geometry import (
    Box,
    box_shape,
    byte_runs,
    contiguous_stride,
    full_box,
    inverse_permutation,
    is_empty,
    relative,
    run_count,
)
from .header import TensorInfo
from .plan import Entry, Source
from .transpose import fused_read_fits

MiB = 1 << 20
DIRECT_ROW = 64 << 10  # smallest row read on its own rather than staged with its neighbours
# A plan of a few MiB is cut into up to SHARES chunks of at least SHARE_MIN bytes, so the
# reader's threads share it instead of one thread copying it while the others wait (a load
# is tensor after tensor): a plan of one source cuts it in SHARES, one of SHARES sources or
# more (experts stacked from per-expert tensors) has chunks enough and cuts none. Constants,
# not the thread count: a plan is the same on every machine, so a dry run elsewhere counts
# exactly the reads made here.
SHARES = 4
SHARE_MIN = 512 << 10

Method = Literal["direct", "fused", "staged"]


@dataclass(frozen=True)
class Destination:
    """The tensor a plan fills (the box of a native tensor), as plain values.

    Attributes:
        dtype: its dtype (a cast is planned where it differs from the source's).
        device: its device type; only ``"cpu"`` destinations are read into directly.
        stride: its element strides; None is contiguous (row-major in native order).
    """

    dtype: torch.dtype
    device: str = "cpu"
    stride: tuple[int, ...] | None = None

    @classmethod
    def of(cls, t: torch.Tensor) -> Destination:
        """The destination ``t`` is."""
        return cls(t.dtype, t.device.type, tuple(t.stride()))

    def contiguous(self, box: Box) -> bool:
        """Whether a destination of ``box``'s shape is row-major contiguous (strides of
        size-1 dims do not matter, as for ``torch.Tensor.is_contiguous``)."""
        if self.stride is None:
            return True
        expected = 1
        for (lo, hi), stride in reversed(list(zip(box, self.stride))):
            if hi - lo != 1 and stride != expected:
                return False
            expected *= hi - lo
        return True


@dataclass(frozen=True)
class ScaleRead:
    """FP8 inverse block scales of one item: read ``box`` of ``source``, expand, multiply.

    Attributes:
        source: the scale tensor ``[ceil(rows / b0), ceil(cols / b1)]``.
        box: the block rows and columns the item's source rows/columns touch (edges may be
            ragged: a block can cover rows outside the item).
        block: ``(b0, b1)`` source elements per scale.
    """

    source: TensorInfo
    box: Box
    block: tuple[int, int]

    @property
    def runs(self) -> list[tuple[int, int]]:
        """Byte runs ``(offset from the scale tensor's first byte, length)``."""
        return byte_runs(self.source.shape, self.source.itemsize, self.box)

    @property
    def nbytes(self) -> int:
        return math.prod(box_shape(self.box)) * self.source.itemsize


@dataclass(frozen=True)
class ReadItem:
    """One read: a region of one source tensor into a region of the destination.

    Attributes:
        source: the HF tensor read: ``file`` (absolute path), ``key``, ``offset`` (absolute
            file offset of its first byte), dtype and shape. The file is the one the
            checkpoint opened; the reader checks it is unchanged around every read.
        source_box: region of the source read, in its own dims ([lo, hi) per dim). Its bytes
            are :attr:`runs`, read back to back they form a row-major tensor of the box's shape.
        dest_box: region of the destination filled, in native dims, relative to the
            destination's first element (the box ``plan_reads`` was given starts at 0).
        dims: native dim -> source dim (``None``: a size-1 stacking dim), as in
            :attr:`lazysd.plan.Source.dims`: the source region seen through ``dims`` is the
            destination region.
        method: how the reader carries it out: ``"direct"``, ``"fused"`` or ``"staged"``
            (module docstring).
        staging: staging bytes the item holds while in flight (0 for direct reads).
        scale: FP8 scales to multiply in (then the item is staged and dequantized), or None.
    """

    source: TensorInfo
    source_box: Box
    dest_box: Box
    dims: tuple[int | None, ...]
    method: Method
    staging: int
    scale: ScaleRead | None = None

    # Cached (in the instance's __dict__, which a frozen dataclass still has): a fill asks
    # for an item's runs several times, and a small tensor's read costs little more.
    @cached_property
    def runs(self) -> list[tuple[int, int]]:
        """Byte runs ``(offset from the source tensor's first byte, length)``, in order, merged."""
        return byte_runs(self.source.shape, self.source.itemsize, self.source_box)

    @cached_property
    def run_count(self) -> int:
        """``len(self.runs)``, without listing them."""
        return run_count(self.source.shape, self.source_box)

    @property
    def data_bytes(self) -> int:
        """Bytes of source data read."""
        return math.prod(box_shape(self.source_box)) * self.source.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes read from disk: source data plus scale blocks."""
        return self.data_bytes + (self.scale.nbytes if self.scale is not None else 0)

    def ranges(self) -> list[tuple[str, int, int]]:
        """``(file, absolute offset, length)`` of every read, scale blocks included."""
        out = [(str(self.source.file), self.source.offset + s, n) for s, n in self.runs]
        if self.scale is not None:
            sc = self.scale.source
            out += [(str(sc.file), sc.offset + s, n) for s, n in self.scale.runs]
        return out


@dataclass(frozen=True)
class ReadTotals:
    """What a plan reads, counted (:func:`read_totals`)."""

    nbytes: int  # bytes read from disk, FP8 scale blocks included
    runs: int  # contiguous byte ranges read (what pread is called for)
    items: int  # read items
    dest_bytes: int  # bytes written into the destination


def _sources(entry: Entry, box: Box, shares: int) -> tuple[list[tuple[Source, tuple[Box, Box]]], int]:
    """The sources ``box`` of ``entry`` needs with their regions
    (:meth:`lazysd.geometry.Block.source_region`), and the shares to cut each into."""
    found = [(src, region) for src in entry.sources if (region := src.source_region(box)) is not None]
    return found, max(1, shares // max(1, len(found)))


# (source sub-box, destination region, method, staging) of one read
_Chunk = tuple[Box, Box, Method, int]


def _chunks_shared(
    src: Source,
    found: tuple[Box, Box],
    box: Box,
    dest: Destination,
    cpu: bool,
    chunk_bytes: int,
    shares: int,
    seen: dict[tuple, list[_Chunk]],
) -> Iterator[_Chunk]:
    """:func:`_chunks`, worked out once for the stacked or permuted sources of one plan that
    share a geometry (a stacked value's experts: the same shape, dtype, placement and
    region size, their regions in different places) and moved into each one's region: a
    per-expert release plans thousands of such sources, each alike but for where it goes.
    ``seen`` holds them for one plan (its box and destination). A permuted source's chunks
    depend on its region's shape only; an unpermuted one's also on where the region lies
    (whole rows of a contiguous destination are one read), and such a source is mostly a
    plan's only one: worked out on its own."""
    if src.identity:
        yield from _chunks(src, found, box, dest, cpu, chunk_bytes, shares)
        return
    src_box, native = found
    info = src.info
    key = (info.shape, info.dtype, src.scale is None, src.dims, src_box, box_shape(native))
    template = seen.get(key)
    if template is None:  # worked out at the origin of a box of the same shape
        at_origin = relative(native, [lo for lo, _ in native])
        origin_box = full_box(box_shape(box))
        template = seen[key] = list(_chunks(src, (src_box, at_origin), origin_box, dest, cpu, chunk_bytes, shares))
    offset = [lo - b for (lo, _), (b, _) in zip(native, box)]
    for sub, region, method, staging in template:
        yield sub, tuple((lo + o, hi + o) for (lo, hi), o in zip(region, offset)), method, staging


def _chunks(
    src: Source, found: tuple[Box, Box], box: Box, dest: Destination, cpu: bool, chunk_bytes: int, shares: int
) -> Iterator[_Chunk]:
    """``(source sub-box, destination region, method, staging)`` of each read of ``src``,
    whose part in ``box`` is ``found``."""
    src_box, native = found
    info = src.info
    region = relative(native, [lo for lo, _ in box]) if any(lo for lo, _ in box) else native
    plain = src.scale is None and dest.dtype == info.dtype and cpu
    if not info.shape:
        yield src_box, region, ("direct" if plain else "staged"), (0 if plain else info.itemsize)
        return
    rows = src_box[0][1] - src_box[0][0]
    # A dequantized chunk is staged in fp32: budget its rows at that size.
    row_bytes = (4 if src.scale is not None else info.itemsize) * math.prod(hi - lo for lo, hi in src_box[1:])
    chunk_bytes = min(chunk_bytes, max(SHARE_MIN, -(-rows * row_bytes // shares)))
    per = max(1, chunk_bytes // max(1, row_bytes))
    native0 = src.dims.index(0)
    if plain and src.identity and dest.contiguous(box) and region[1:] == full_box(box_shape(box))[1:]:
        # The common case, decided on plain values: whole rows of an unpermuted source into a
        # contiguous destination are contiguous there, every chunk a direct read.
        for r in range(0, rows, per):
            n = min(per, rows - r)
            yield (
                ((src_box[0][0] + r, src_box[0][0] + r + n), *src_box[1:]),
                ((region[0][0] + r, region[0][0] + r + n), *region[1:]),
                "direct",
                0,
            )
        return
    # Whether bytes can go straight into place depends only on the shapes and strides of
    # the destination region and of each chunk, which the sources of a stacked tensor share
    # (hundreds of experts): decided once per geometry (:func:`_in_source_order`).
    stride = dest.stride if dest.stride is not None else contiguous_stride(box_shape(box))
    geometry = (box_shape(region), stride, src.dims)
    whole = _in_source_order(*geometry, rows)[0]
    if plain and row_bytes >= DIRECT_ROW and not whole and _in_source_order(*geometry, 1)[0]:
        per = 1  # contiguous row by row only: one direct read per row beats staging
    perm = [d for d in src.dims if d is not None]
    # The kernel's case: the last two source dims swapped, nothing else moved, no cast.
    swapped = (
        plain
        and perm == [*range(len(perm) - 2), len(perm) - 1, len(perm) - 2]
        and len(perm) in (2, 3)
        and src_box[-1] == (0, info.shape[-1])
    )
    for r in range(0, rows, per):
        n = min(per, rows - r)
        sub = ((src_box[0][0] + r, src_box[0][0] + r + n), *src_box[1:])
        lo0 = region[native0][0] + r
        dest_region = (*region[:native0], (lo0, lo0 + n), *region[native0 + 1 :])
        direct, shape, strides = _in_source_order(*geometry, n)
        if plain and direct:
            yield sub, dest_region, "direct", 0
        elif swapped and run_count(info.shape, sub) == 1 and fused_read_fits(shape, strides, info.itemsize):
            # Warm, the kernel needs only its block buffer; cold, the reader stages the
            # whole chunk for one bulk read (lazysd.reader): budgeted for the latter.
            yield sub, dest_region, "fused", n * row_bytes
        else:
            yield sub, dest_region, "staged", n * row_bytes


@functools.lru_cache(maxsize=4096)
def _in_source_order(
    shape: tuple[int, ...], stride: tuple[int, ...], dims: tuple[int | None, ...], rows: int
) -> tuple[bool, tuple[int, ...], tuple[int, ...]]:
    """For a destination region of ``shape`` and element ``stride`` that a source placed by
    ``dims`` fills, and a chunk of its first ``rows`` source rows: whether the chunk is
    contiguous in source order (a direct read), and the chunk's shape and strides without
    the stacking dims (where the transpose kernel would write).

    A meta tensor with those strides stands in for the destination: torch's own view
    arithmetic decides, without memory.
    """
    view = torch.empty_strided(shape, stride, dtype=torch.uint8, device="meta")
    chunk = view.narrow(dims.index(0), 0, rows)[tuple(0 if d is None else slice(None) for d in dims)]
    as_source = chunk.permute(inverse_permutation([d for d in dims if d is not None]))
    return as_source.is_contiguous(), tuple(chunk.shape), chunk.stride()


def plan_reads(
    entry: Entry,
    box: Box,
    dest: Destination,
    *,
    chunk_bytes: int = 8 * MiB,
    shares: int = SHARES,
) -> tuple[ReadItem, ...]:
    """The reads that fill ``box`` of ``entry`` into a destination like ``dest``. Pure.

    Args:
        entry: the native tensor's plan entry (its sources, their placement and scales).
        box: the region of the native tensor wanted, ``[lo, hi)`` per dim.
        dest: the destination tensor (the box's shape): dtype, device type, strides.
        chunk_bytes: target size of one read (source rows are never split; a dequantized
            FP8 chunk counts at fp32).
        shares: cut a plan of a few MiB into up to this many chunks (:data:`SHARES`; 1
            for remote storage, where every chunk is a request and concurrency comes from
            the requests of several tensors in flight).

    Returns:
        Items in source order, then row order; none for an empty box. Their destination
        regions tile the box; each source byte the box needs is in exactly one item.
    """
    if is_empty(box):
        return ()
    cpu = dest.device == "cpu"
    items = []
    sources, shares = _sources(entry, box, shares)
    seen: dict[tuple, list[_Chunk]] = {}
    for src, found in sources:
        for sub, region, method, staging in _chunks_shared(src, found, box, dest, cpu, chunk_bytes, shares, seen):
            scale = None
            if src.scale is not None:
                scale = ScaleRead(src.scale.info, src.scale.region(sub), src.scale.block)
            items.append(ReadItem(src.info, sub, region, src.dims, method, staging, scale))
    return tuple(items)


def source_ranges(entry: Entry, box: Box) -> list[tuple[str, int, int]]:
    """``(file, offset, length)`` of the source bytes that ``box`` of ``entry`` needs, FP8
    scale blocks included: what any plan of the box reads (chunking only cuts it up, or
    reads a scale block shared by two chunks twice). Cheap: no read items are built.

    Example:
        >>> source_ranges(vsd.entry("model.norm.weight"), ((0, 4096),))  # doctest: +SKIP
        [('/ckpt/model-00005-of-00005.safetensors', 1056, 8192)]
    """
    out = []
    for src in entry.sources:
        found = src.source_region(box)
        if found is not None and not is_empty(found[0]):
            info = src.info
            out += [(str(info.file), info.offset + s, n) for s, n in byte_runs(info.shape, info.itemsize, found[0])]
            if src.scale is not None:
                sc = src.scale.info
                runs = byte_runs(sc.shape, sc.itemsize, src.scale.region(found[0]))
                out += [(str(sc.file), sc.offset + s, n) for s, n in runs]
    return out


def read_totals(
    entry: Entry, box: Box, dest: Destination, *, chunk_bytes: int = 8 * MiB, shares: int = SHARES
) -> ReadTotals:
    """Bytes, runs and items of ``plan_reads(entry, box, dest, chunk_bytes=..., shares=...)``, counted
    over the same chunks without building the items or listing their runs."""
    if is_empty(box):
        return ReadTotals(0, 0, 0, 0)
    cpu = dest.device == "cpu"
    nbytes = runs = items = 0
    sources, shares = _sources(entry, box, shares)
    seen: dict[tuple, list[_Chunk]] = {}
    for src, found in sources:
        info = src.info
        for sub, _, _, _ in _chunks_shared(src, found, box, dest, cpu, chunk_bytes, shares, seen):
            items += 1
            nbytes += math.prod(box_shape(sub)) * info.itemsize
            runs += run_count(info.shape, sub)
            if src.scale is not None:
                sb = src.scale.region(sub)
                nbytes += math.prod(box_shape(sb)) * src.scale.info.itemsize
                runs += run_count(src.scale.info.shape, sb)
    return ReadTotals(nbytes, runs, items, math.prod(box_shape(box)) * dest.dtype.itemsize)
