"""Regions of tensors: boxes, placed blocks, byte runs, Shard(d) chunking and placement mapping.

One vocabulary for "which part of which tensor", shared by planning, reading, the dry-run
plans, the distributed views and export. Everything here is pure arithmetic on plain values
(shapes, boxes, mesh shapes, placements); nothing reads data or needs a process group.

* A :data:`Box` is a region of a tensor: one ``(lo, hi)`` pair per dimension, half-open, in
  that tensor's coordinates (torch DCP's ``ChunkStorageMetadata(offsets, sizes)`` says the
  same with ``offsets = lo`` and ``sizes = hi - lo``).
* A :class:`Block` is a source tensor placed inside a larger native tensor: where its region
  starts and how its dimensions are permuted (and stacked) into native ones. The plan's HF
  sources (:class:`lazysd.plan.Source`) and export's pieces (:class:`lazysd.reverse.HFPiece`)
  are both Blocks.
* :func:`byte_runs` lists the contiguous byte ranges of a box of a row-major tensor;
  :func:`run_count` counts them without listing them.
* :func:`chunk_range` and :func:`shard_box` are DTensor's ``Shard(d)`` rule (``torch.chunk``:
  ``ceil(n / parts)`` per rank, the last ranks get fewer, possibly none) over a mesh given as
  a shape and this rank's coordinate.
* :func:`source_placements` maps a native tensor's placements onto one of its blocks.

Example:
    >>> b = Block(start=(0, 0, 4), dims=(0, 2, 1), shape=(2, 4, 3))   # [E, I, D] at native [E, D, 2I]
    >>> b.box
    ((0, 2), (0, 3), (4, 8))
    >>> b.source_region(((1, 2), (0, 3), (0, 6)))   # expert 1, native columns 0..6
    (((1, 2), (0, 2), (0, 3)), ((1, 2), (0, 3), (4, 6)))
    >>> byte_runs((4, 6), 2, ((1, 3), (0, 6)))       # two whole rows: one run
    [(12, 24)]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[tuple[int, int], ...]  # per dimension, [lo, hi)


def full_box(shape: Iterable[int]) -> Box:
    """The box covering a whole tensor of ``shape``."""
    return tuple((0, int(s)) for s in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    """Sizes of a box."""
    return tuple(hi - lo for lo, hi in box)


def is_empty(box: Box) -> bool:
    """Whether a box holds no element."""
    return any(lo >= hi for lo, hi in box)


def contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a row-major tensor of ``shape``.

    Example:
        >>> contiguous_stride((2, 3, 4))
        (12, 4, 1)
    """
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def inverse_permutation(perm: Sequence[int]) -> list[int]:
    """The permutation that undoes ``perm``: ``t.permute(perm).permute(inverse_permutation(perm))`` is ``t``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def relative(box: Box, origin: Sequence[int]) -> Box:
    """``box`` in the coordinates of a region whose first element sits at ``origin``."""
    return tuple((lo - o, hi - o) for (lo, hi), o in zip(box, origin))


@dataclass(frozen=True)
class Block:
    """A source tensor of ``shape`` placed in a native tensor.

    Attributes:
        start: native coordinates where the block begins.
        dims: for each native dimension, the source dimension feeding it; ``None`` is a
            size-1 stacking dimension (per-expert tensors stacked on it).
        shape: the source tensor's own shape.
    """

    start: tuple[int, ...]
    dims: tuple[int | None, ...]
    shape: tuple[int, ...]

    @property
    def extent(self) -> tuple[int, ...]:
        """Size of the block in native dimension order."""
        return tuple(1 if d is None else self.shape[d] for d in self.dims)

    @property
    def box(self) -> Box:
        """The native region the block fills."""
        return tuple((s, s + e) for s, e in zip(self.start, self.extent))

    @property
    def identity(self) -> bool:
        """Whether the source is the native tensor's region unpermuted and unstacked."""
        return self.dims == tuple(range(len(self.shape)))

    def source_region(self, box: Box) -> tuple[Box, Box] | None:
        """The part of the source that native ``box`` needs, or None if they miss.

        Returns ``(source_box, native_box)``: the region in source dimension order (what is
        read) and the same region in native coordinates (where it lands).
        """
        # One pass over the dims, no intermediate boxes: a plan of a stacked tensor asks this
        # of every expert's block.
        src: list[tuple[int, int]] = [(0, 1)] * len(self.shape)
        native = []
        for (lo, hi), start, d in zip(box, self.start, self.dims):
            end = start + (1 if d is None else self.shape[d])
            lo, hi = max(lo, start), min(hi, end)
            if lo >= hi:
                return None
            native.append((lo, hi))
            if d is not None:
                src[d] = (lo - start, hi - start)
        return tuple(src), tuple(native)


# ---- byte runs of a row-major tensor --------------------------------------------------------
def _run_split(shape: Sequence[int], box: Box) -> int:
    """The outermost dimension whose inner dims are all whole in ``box``: runs span from it."""
    k = len(shape) - 1
    while k > 0 and box[k] == (0, shape[k]):
        k -= 1
    return k


def byte_runs(shape: Sequence[int], itemsize: int, box: Box) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` of ``box`` in a row-major tensor, in order, merged.

    Offsets count from the tensor's first byte.

    Example:
        >>> byte_runs((4, 6), 2, ((0, 2), (1, 3)))   # columns 1..3 of two rows
        [(2, 4), (14, 4)]
    """
    ndim = len(shape)
    if ndim == 0:
        return [(0, itemsize)]
    strides = [itemsize * math.prod(shape[i + 1 :]) for i in range(ndim)]
    k = _run_split(shape, box)
    run_len = (box[k][1] - box[k][0]) * strides[k]
    if all(hi - lo == 1 for lo, hi in box[:k]):  # one run (most reads): no arrays
        return [(sum(lo * st for (lo, _), st in zip(box[: k + 1], strides)), run_len)]
    starts = np.array([box[k][0] * strides[k]], dtype=np.int64)
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


def run_count(shape: Sequence[int], box: Box) -> int:
    """``len(byte_runs(shape, _, box))`` without listing them.

    Runs of consecutive outer indices never merge unless the whole inner region is complete,
    which :func:`_run_split` has already folded into one run.
    """
    if not shape:
        return 1
    k = _run_split(shape, box)
    return math.prod(hi - lo for lo, hi in box[:k]) if k > 0 else 1


# ---- Shard(d) over a mesh -------------------------------------------------------------------
def chunk_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """``[lo, hi)`` of chunk ``i`` of ``torch.chunk`` over ``n`` rows in ``parts`` (DTensor ``Shard``).

    Example:
        >>> [chunk_range(5, 4, i) for i in range(4)]
        [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    size = -(-n // parts)
    lo = min(i * size, n)
    return lo, min(lo + size, n)


def shard_dim(placement: Any) -> int | None:
    """The tensor dim a placement shards: ``Shard(d)`` (or a plain int ``d``) -> d, else None."""
    if isinstance(placement, int) and not isinstance(placement, bool):
        return placement
    if type(placement).__name__ == "Shard":
        return int(placement.dim)
    return None


def shard_box(
    shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any]
) -> Box:
    """The box of a tensor of ``shape`` that the mesh rank at ``coordinate`` holds.

    ``placements`` has one entry per mesh dim: ``Shard(d)`` (or the int ``d``) splits tensor
    dim ``d`` by :func:`chunk_range`; anything else (``Replicate()``, ``None``) keeps it whole.
    Several mesh dims sharding one tensor dim split it in mesh-dim order, as DTensor does.

    Example:
        >>> shard_box((10, 6), (2, 2), (1, 0), [1, 0])   # Shard(1) on dim 0 of the mesh, Shard(0) on dim 1
        ((0, 5), (3, 6))
    """
    lo = [0] * len(shape)
    size = list(shape)
    for mesh_dim, p in enumerate(placements):
        d = shard_dim(p)
        if d is None:
            continue
        a, b = chunk_range(size[d], mesh_shape[mesh_dim], coordinate[mesh_dim])
        lo[d] += a
        size[d] = b - a
    return tuple((o, o + n) for o, n in zip(lo, size))


def mesh_coordinate(mesh_shape: Sequence[int], rank: int) -> tuple[int, ...]:
    """Coordinate of ``rank`` in a row-major mesh of ``mesh_shape`` (the last dim varies fastest)."""
    coord = []
    for n in reversed(mesh_shape):
        coord.append(rank % n)
        rank //= n
    return tuple(reversed(coord))


def source_placements(block: Block, native_shape: Sequence[int], placements: Sequence[Any]) -> list[int | None] | None:
    """A native tensor's placements carried onto one of its blocks, as plain values.

    Returns one entry per mesh dim: the source dim that mesh dim shards (an int), or None for
    one that replicates. Returns None where the native placements are no placements of the
    block: a shard of the stacking dim, of a dim the block covers only part of (the gate/up
    concatenation dim), or a placement other than ``Shard``/``Replicate`` (e.g. ``Partial``).

    Example:
        >>> from torch.distributed.tensor import Replicate, Shard
        >>> down = Block((0, 0, 0), (0, 2, 1), (8, 16, 32))   # [E, I, D] at native [E, D, I]
        >>> source_placements(down, (8, 32, 16), [Shard(0), Shard(1), Replicate()])
        [0, 2, None]
    """
    out: list[int | None] = []
    extent = block.extent
    for p in placements:
        d = shard_dim(p)
        if d is None:
            if type(p).__name__ != "Replicate" and p is not None:
                return None
            out.append(None)
            continue
        src = block.dims[d]
        if src is None or extent[d] != native_shape[d]:
            return None
        out.append(src)
    return out
