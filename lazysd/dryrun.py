"""Dry-run load plans and provenance: what each rank of a parallel layout reads, from headers.

Nothing here reads tensor data. Every byte count comes from the read items of
:mod:`lazysd.reads` (:func:`~lazysd.reads.plan_reads` / :func:`~lazysd.reads.read_totals`),
the same items the reader executes, for the destination a load would fill (the state
dict's dtype and device, the reader's memory layout and chunking): so a plan's bytes are the
bytes a load reads, FP8 scale blocks included. Reachable from a ``VirtualStateDict``:

* ``vsd.explain(key, ep=...)``: which HF tensors, files and byte ranges make one native tensor,
  how it is transformed, and which bytes each rank reads (:func:`explain`).
* ``vsd.rank_plan(ep, ...)``: a dry-run load plan, bytes each rank reads (:func:`rank_plan`).

Parallel layouts (:class:`EPLayout`, the NeMo Automodel expert-parallel convention):

* ``ep``: routed-expert tensors (``Entry.kind == "experts"``) are ``Shard(0)`` over ``ep``
  ranks, contiguous expert ranges. When ``ep`` does not divide the expert count the split
  follows DTensor's ``Shard(0)`` (:func:`lazysd.geometry.chunk_range`): ``ceil(E / ep)``
  experts per rank, the last ranks get fewer, possibly none.
* ``ep_shard``: a second mesh dim that also shards experts on native dim 1 (FSDP over
  experts, placements ``[Shard(1) on ep_shard, Shard(0) on ep]``). The mesh is
  ``(ep_shard, ep)``, row-major: ``rank = ep_shard_rank * ep + ep_rank``.
* every other tensor (attention, norms, routers, shared experts, embeddings, head) is read
  whole by every rank (replicated), unless ``fsdp=True``: then it is ``Shard(0)`` over all
  ``ep * ep_shard`` ranks (``torch.chunk`` semantics, like FSDP2's default).
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MissingKeyError, PlacementError, ShapeMismatchError
from .geometry import Box, chunk_range, full_box, is_empty, mesh_coordinate, shard_box
from .inspect import Planned, bytes_text, human_bytes, layer_of
from .plan import Entry, dtype_name
from .reads import SHARES, Destination, ReadItem, plan_reads, read_totals


def _box_text(box: Box) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in box) + "]"


def destination(vsd: Planned, entry: Entry, box: Box) -> Destination:
    """The destination materializing ``box`` of ``entry`` fills (dtype, device, memory layout)."""
    return vsd.reader.destination(entry, box, vsd.dtype_of(entry), vsd.device)


# ---- reads of one box -----------------------------------------------------------------------
@dataclass(frozen=True)
class SourceRead:
    """The part of one HF tensor that one box of a native tensor reads: its read items."""

    hf_key: str
    file: Path
    src_box: Box  # in the HF tensor's own dims, [lo, hi): the region its items cover
    nbytes: int  # bytes read from the file (with FP8 block scales, if any)
    runs: int  # contiguous byte ranges read (what pread is called for), scales included
    items: tuple[ReadItem, ...] = field(repr=False, compare=False)

    def ranges(self) -> list[tuple[int, int]]:
        """Absolute ``[start, end)`` file offsets of the tensor data read, in order.

        Computed on demand: a sharded expert tensor can be many thousands of ranges.
        """
        return [(i.source.offset + s, i.source.offset + s + n) for i in self.items for s, n in i.runs]


def box_reads(
    entry: Entry, box: Box, dest: Destination, chunk_bytes: int = 8 << 20, shares: int = SHARES
) -> tuple[SourceRead, ...]:
    """The read items of ``box`` of ``entry``, grouped by HF tensor (none for an empty box)."""
    groups: dict[str, list[ReadItem]] = {}
    for item in plan_reads(entry, box, dest, chunk_bytes=chunk_bytes, shares=shares):
        groups.setdefault(item.source.key, []).append(item)
    out = []
    for items in groups.values():
        info = items[0].source
        lo = [min(i.source_box[d][0] for i in items) for d in range(len(info.shape))]
        hi = [max(i.source_box[d][1] for i in items) for d in range(len(info.shape))]
        runs = sum(i.run_count + (0 if i.scale is None else len(i.scale.runs)) for i in items)
        out.append(
            SourceRead(info.key, info.file, tuple(zip(lo, hi)), sum(i.nbytes for i in items), runs, tuple(items))
        )
    return tuple(out)


# ---- layouts --------------------------------------------------------------------------------
#: Ranks a dry run (plan, explain) covers at most (the largest real deployments are a few thousand).
MAX_DRY_RUN_RANKS = 65536


@dataclass(frozen=True)
class EPLayout:
    """A dry-run parallel layout: ``ep`` x ``ep_shard`` ranks (see the module docstring)."""

    ep: int = 1  # expert-parallel ranks: experts Shard(0)
    ep_shard: int = 1  # experts additionally Shard(1) over this many ranks
    fsdp: bool = False  # non-expert tensors Shard(0) over all ranks instead of replicated

    def __post_init__(self) -> None:
        for name in ("ep", "ep_shard"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise PlacementError(f"{name} must be a positive integer, got {value!r}")
        if self.ep * self.ep_shard > MAX_DRY_RUN_RANKS:
            # Dry runs go rank by rank: an absurd count (a typo, 10**9) must not loop for hours.
            raise PlacementError(
                f"ep={self.ep} x ep_shard={self.ep_shard} is {self.ep * self.ep_shard} ranks; a dry run covers at most "
                f"{MAX_DRY_RUN_RANKS}"
            )

    @property
    def world(self) -> int:
        return self.ep * self.ep_shard

    def coords(self, rank: int) -> tuple[int, int]:
        """``(ep_rank, ep_shard_rank)`` of a rank of the row-major ``(ep_shard, ep)`` mesh."""
        return rank % self.ep, rank // self.ep

    def box(self, entry: Entry, rank: int) -> Box:
        """The box of ``entry`` that ``rank`` holds (and reads), by DTensor's Shard rule."""
        if entry.kind == "experts":
            # mesh (ep_shard, ep): Shard(1) on ep_shard, Shard(0) on ep
            placements = [1 if self.ep_shard > 1 else None, 0]
            return shard_box(
                entry.shape, (self.ep_shard, self.ep), mesh_coordinate((self.ep_shard, self.ep), rank), placements
            )
        if self.fsdp and entry.shape:
            return shard_box(entry.shape, (self.world,), (rank,), [0])
        return full_box(entry.shape)

    def describe(self, num_experts: int | None) -> str:
        if num_experts is None:
            experts = "no routed-expert tensors"
        else:
            per = -(-num_experts // self.ep)
            even = "" if num_experts % self.ep == 0 else ", uneven: torch.chunk gives the last ranks fewer"
            experts = f"experts Shard(0): {num_experts} experts, {per} per rank{even}"
            if self.ep_shard > 1:
                experts += f"; Shard(1) over ep_shard={self.ep_shard}"
        others = f"other tensors Shard(0) over all {self.world} ranks" if self.fsdp else "other tensors replicated"
        return f"{self.mesh} ({experts}; {others})"

    @property
    def mesh(self) -> str:
        """``'ep=4'`` or ``'ep=4 x ep_shard=2'``."""
        return f"ep={self.ep}" + (f" x ep_shard={self.ep_shard}" if self.ep_shard > 1 else "")


def _check_tiling(vsd: Planned, entry: Entry) -> None:
    """The sources of ``entry`` lie inside it and cover it exactly (header-only check)."""
    covered = 0
    for src in entry.sources:
        ext = src.extent
        if len(ext) != len(entry.shape) or any(s < 0 or s + e > n for s, e, n in zip(src.start, ext, entry.shape)):
            raise ShapeMismatchError(
                f"{src.info.file}, key {src.info.key!r}: block at {list(src.start)} of size {list(ext)} "
                f"falls outside native {entry.key} {list(entry.shape)}"
            )
        covered += math.prod(ext)
    if covered != entry.numel:
        raise ShapeMismatchError(
            f"{vsd.checkpoint.path}: sources of {entry.key} ({', '.join(entry.hf_keys[:3])}) cover {covered} of its "
            f"{entry.numel} elements"
        )


# ---- explain --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpan:
    """One HF tensor feeding a native tensor."""

    hf_key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of its first byte
    end: int  # one past its last byte: the tensor is file bytes [start, end)
    native_block: Box  # where it lands in the native tensor (before any ep split)


@dataclass(frozen=True)
class RankRead:
    """What one rank reads of one native tensor."""

    rank: int
    ep_rank: int
    ep_shard_rank: int
    box: Box  # native coordinates, [lo, hi) per dim
    reads: tuple[SourceRead, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.reads)

    @property
    def runs(self) -> int:
        return sum(r.runs for r in self.reads)


def _ranges_text(read: SourceRead, limit: int = 3) -> str:
    if read.runs > 50_000:  # listing them would cost more than the answer is worth
        return f"{read.runs} ranges"
    ranges = read.ranges()
    shown = ", ".join(f"[{s}, {e})" for s, e in ranges[:limit])
    return shown + (f", ... {len(ranges) - limit} more" if len(ranges) > limit else "")


@dataclass(frozen=True)
class Explanation:
    """Provenance of one native tensor, and (given a layout) what each rank reads of it.

    ``str()`` gives a readable report, ``_repr_html_`` the same in a notebook.
    """

    key: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # as read (after a dtype= cast)
    source_dtype: torch.dtype
    transform: str  # e.g. "permute(0, 2, 1), cat 2 parts on dim 2"
    sources: tuple[SourceSpan, ...]
    layout: EPLayout | None
    ranks: tuple[RankRead, ...]  # empty without a layout

    def _rank_groups(self) -> list[tuple[int, int, RankRead]]:
        """Consecutive ranks with the same box collapsed (replicated tensors: one line)."""
        groups: list[tuple[int, int, RankRead]] = []
        for r in self.ranks:
            if groups and groups[-1][2].box == r.box:
                groups[-1] = (groups[-1][0], r.rank, groups[-1][2])
            else:
                groups.append((r.rank, r.rank, r))
        return groups

    def __str__(self) -> str:
        cast = "" if self.dtype == self.source_dtype else f" (stored {dtype_name(self.source_dtype)})"
        lines = [
            f"{self.key}  {list(self.shape)} {dtype_name(self.dtype)}{cast}  kind={self.kind}",
            f"  transform: {self.transform}",
            f"  sources ({len(self.sources)}):",
        ]
        for s in self.sources[:8]:
            lines.append(
                f"    {s.hf_key}  {list(s.shape)} {dtype_name(s.dtype)}  {s.file.name} bytes [{s.start}, {s.end})  -> "
                f"native {_box_text(s.native_block)}"
            )
        if len(self.sources) > 8:
            lines.append(f"    ... {len(self.sources) - 8} more")
        if self.layout is not None:
            if self.kind == "experts":
                lines.append(f"  layout: {self.layout.describe(self.shape[0])}")
            else:
                how = (
                    f"Shard(0) over all {self.layout.world} ranks"
                    if self.layout.fsdp
                    else "replicated, every rank reads it whole"
                )
                lines.append(f"  layout: {self.layout.mesh} ({self.kind} tensor: {how})")
            for first, last, r in self._rank_groups():
                who = f"rank {first}" if first == last else f"ranks {first}-{last}"
                lines.append(f"    {who}: box {_box_text(r.box)}, {bytes_text(r.nbytes)} in {r.runs} range(s)")
                for read in r.reads[:4]:
                    lines.append(f"      {read.hf_key}  {read.file.name}  {_ranges_text(read)}")
                if len(r.reads) > 4:
                    lines.append(f"      ... {len(r.reads) - 4} more sources")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<pre class='lazysd-explain'>{html.escape(str(self))}</pre>"


def explain(vsd: Planned, key: str, layout: EPLayout | None = None) -> Explanation:
    """Where native tensor ``key`` comes from, and what each rank of ``layout`` reads of it.

    Example:
        >>> print(vsd.explain("model.layers.1.moe.experts.down_projs", ep=2))   # doctest: +SKIP
        model.layers.1.moe.experts.down_projs  [8, 16, 32] bfloat16  kind=experts
          transform: permute(0, 2, 1)
          ...
    """
    entry = vsd.entry(key)
    _check_tiling(vsd, entry)
    spans = tuple(
        SourceSpan(
            s.info.key,
            s.info.file,
            s.info.dtype,
            s.info.shape,
            s.info.offset,
            s.info.offset + s.info.nbytes,
            tuple((st, st + e) for st, e in zip(s.start, s.extent)),
        )
        for s in entry.sources
    )
    ranks: tuple[RankRead, ...] = ()
    if layout is not None:
        chunk = vsd.reader.options.chunk_bytes
        ranks = tuple(
            RankRead(
                r,
                *layout.coords(r),
                (b := layout.box(entry, r)),
                box_reads(entry, b, destination(vsd, entry, b), chunk, vsd.reader.shares),
            )
            for r in range(layout.world)
        )
    return Explanation(
        entry.key,
        entry.kind,
        entry.shape,
        vsd.dtype_of(entry),
        entry.source_dtype,
        entry.transform,
        spans,
        layout,
        ranks,
    )


# ---- dry-run load plans ---------------------------------------------------------------------
@dataclass(frozen=True)
class RankPlan:
    """What one rank reads to load its part of every planned key."""

    rank: int
    ep_rank: int
    ep_shard_rank: int
    experts: tuple[int, int] | None  # [lo, hi) of routed experts held; None without experts
    nbytes: int  # bytes read from disk
    runs: int  # contiguous byte ranges read
    by_kind: dict[str, int] = field(hash=False)  # module kind -> bytes read
    by_layer: dict[str, int] = field(hash=False)  # layer label (layer_of) -> bytes read
    requests: int = 0  # storage requests the reads take (ranged GETs after coalescing, remote)


@dataclass(frozen=True)
class LoadPlan:
    """A dry-run load: bytes each rank of a :class:`EPLayout` reads, from headers alone.

    Built by :func:`rank_plan` after checking every planned tensor (sources tile it exactly;
    the layout applies to it), so a bad mapping fails here, before any tensor byte is read.
    """

    path: Path
    layout: EPLayout
    keys: tuple[str, ...]
    num_experts: int | None  # routed experts per MoE layer (None: no expert tensors)
    checkpoint_bytes: int  # bytes of all planned tensors read once (what ep=1 reads)
    ranks: tuple[RankPlan, ...]
    _entries: tuple[Entry, ...] = field(repr=False, compare=False)
    _vsd: Planned | None = field(repr=False, compare=False, default=None)  # for reads(): its reader's destinations
    remote: bool = False  # a remote checkpoint: the table also shows ranged GETs per rank

    @property
    def imbalance(self) -> float:
        """Largest rank's bytes over the mean (1.0 is perfectly balanced)."""
        sizes = [r.nbytes for r in self.ranks]
        mean = sum(sizes) / len(sizes)
        return max(sizes) / mean if mean else 1.0

    @property
    def total_bytes(self) -> int:
        """Bytes read by all ranks together."""
        return sum(r.nbytes for r in self.ranks)

    def boxes(self, rank: int) -> dict[str, Box]:
        """Native key -> the box ``rank`` reads (empty boxes left out)."""
        out = {}
        for e in self._entries:
            box = self.layout.box(e, rank)
            if not is_empty(box):
                out[e.key] = box
        return out

    def reads(self, rank: int, key: str) -> tuple[SourceRead, ...]:
        """The exact reads of ``key`` on ``rank``; ``SourceRead.ranges()`` lists byte ranges."""
        entry = next((e for e in self._entries if e.key == key), None)
        if entry is None:
            raise MissingKeyError(f"{self.path}: no native key {key!r} in this plan of {len(self.keys)} keys")
        assert self._vsd is not None
        box = self.layout.box(entry, rank)
        reader = self._vsd.reader
        return box_reads(entry, box, destination(self._vsd, entry, box), reader.options.chunk_bytes, reader.shares)

    def layer_rows(self) -> list[tuple[str, int, int, int]]:
        """Per layer: ``(label, min bytes over ranks, max bytes over ranks, total over ranks)``."""
        labels = list(dict.fromkeys(layer_of(k) for k in self.keys))
        rows = []
        for label in labels:
            sizes = [r.by_layer.get(label, 0) for r in self.ranks]
            rows.append((label, min(sizes), max(sizes), sum(sizes)))
        return rows

    def lines(self, *, layers: bool = True) -> list[str]:
        out = [
            f"dry-run load plan: {self.layout.describe(self.num_experts)}",
            f"  {len(self.keys)} keys checked from headers; {human_bytes(self.checkpoint_bytes)} "
            f"({self.checkpoint_bytes:,} B) to read once",
            f"  {'rank':>4}  {'experts':<9} {'bytes':>16}  {'human':>10}  {'ranges':>7}  {'experts share':>13}",
        ]
        if self.remote:
            out[-1] += f"  {'GETs':>7}"
        for r in self.ranks:
            experts = "-" if r.experts is None else f"{r.experts[0]}:{r.experts[1]}"
            share = f"{100 * r.by_kind.get('experts', 0) / max(r.nbytes, 1):.1f}%"
            out.append(
                f"  {r.rank:>4}  {experts:<9} {r.nbytes:>16,}  {human_bytes(r.nbytes):>10}  {r.runs:>7,}  {share:>13}"
            )
            if self.remote:
                out[-1] += f"  {r.requests:>7,}"
        if self.remote:
            out.append(f"  all ranks: {sum(r.requests for r in self.ranks):,} ranged GET requests (after coalescing)")
        out.append(
            f"  all ranks: {human_bytes(self.total_bytes)} ({self.total_bytes / max(self.checkpoint_bytes, 1):.2f}x "
            "the checkpoint); "
            f"imbalance max/mean {self.imbalance:.3f}"
        )
        if layers:
            out.append(f"  {'layer':<6} {'per rank min':>12} {'per rank max':>12} {'all ranks':>12}")
            for label, lo, hi, total in self.layer_rows():
                out.append(f"  {label:<6} {human_bytes(lo):>12} {human_bytes(hi):>12} {human_bytes(total):>12}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        first, second = self.lines(layers=False)[:2]
        head = html.escape(first) + "<br>" + html.escape(second.strip())
        rows = "".join(
            f"<tr><td>{r.rank}</td><td>{'-' if r.experts is None else f'{r.experts[0]}:{r.experts[1]}'}</td>"
            f"<td style='text-align:right'>{r.nbytes:,}</td><td>{human_bytes(r.nbytes)}</td><td>{r.runs:,}</td></tr>"
            for r in self.ranks[:256]
        )
        more = f"<tr><td colspan='5'>... {len(self.ranks) - 256} more ranks</td></tr>" if len(self.ranks) > 256 else ""
        foot = html.escape(f"imbalance max/mean {self.imbalance:.3f}; all ranks read {human_bytes(self.total_bytes)}")
        return (
            f"<div class='lazysd-plan'>{head}<table><thead><tr><th>rank</th><th>experts</th><th>bytes</th>"
            "<th></th><th>ranges</th></tr></thead>"
            f"<tbody>{rows}{more}</tbody></table>{foot}</div>"
        )


def rank_plan(vsd: Planned, layout: EPLayout, *, keys: Iterable[str] | None = None) -> LoadPlan:
    """Dry-run ``layout`` over the planned keys (all, or ``keys``): bytes each rank reads.

    Reads no tensor data. Raises :class:`~lazysd.errors.PlacementError` when the layout
    cannot apply (e.g. ``ep_shard`` over 1-d expert tensors) and
    :class:`~lazysd.errors.ShapeMismatchError` when a tensor's sources do not tile it.

    Example:
        >>> plan = vsd.rank_plan(ep=4)                             # doctest: +SKIP
        >>> [r.nbytes for r in plan.ranks], plan.imbalance         # doctest: +SKIP
    """
    entries = tuple(vsd.entry(k) for k in (vsd if keys is None else keys))
    chunk = vsd.reader.options.chunk_bytes
    experts = {e.shape[0] for e in entries if e.kind == "experts" and e.shape}
    for e in entries:
        _check_tiling(vsd, e)
        if e.kind == "experts" and (len(e.shape) < 1 + (layout.ep_shard > 1)):
            raise PlacementError(
                f"{e.sources[0].info.file}, key {e.sources[0].info.key!r}: native {e.key} {list(e.shape)} has no "
                f"dim {1 if e.shape else 0} to shard for {layout.mesh}"
            )
    num_experts = max(experts) if experts else None

    ranks = []
    cache: dict[tuple[str, Box], tuple[int, int]] = {}  # (key, box) -> (bytes, runs)

    def totals(e: Entry, box: Box) -> tuple[int, int]:
        found = cache.get((e.key, box))
        if found is None:
            t = read_totals(e, box, destination(vsd, e, box), chunk_bytes=chunk, shares=vsd.reader.shares)
            found = cache[(e.key, box)] = (t.nbytes, t.runs)
        return found

    remote = not vsd.checkpoint.local
    gets: dict[tuple[str, Box], int] = {}  # (key, box) -> ranged GETs (remote only)

    def requests(e: Entry, box: Box) -> int:
        if (e.key, box) not in gets:
            gets[(e.key, box)] = vsd.reader.request_count(e, box, destination(vsd, e, box))
        return gets[(e.key, box)]

    for rank in range(layout.world):
        by_kind: Counter[str] = Counter()
        by_layer: Counter[str] = Counter()
        nbytes = runs = calls = 0
        for e in entries:
            box = layout.box(e, rank)
            n, r = totals(e, box)
            nbytes += n
            runs += r
            calls += requests(e, box) if remote and n else 0
            by_kind[e.kind] += n
            by_layer[layer_of(e.key)] += n
        ep_rank, shard_rank = layout.coords(rank)
        held = chunk_range(num_experts, layout.ep, ep_rank) if num_experts is not None else None
        ranks.append(RankPlan(rank, ep_rank, shard_rank, held, nbytes, runs, dict(by_kind), dict(by_layer), calls))
    once = sum(totals(e, full_box(e.shape))[0] for e in entries)
    return LoadPlan(
        vsd.checkpoint.path,
        layout,
        tuple(e.key for e in entries),
        num_experts,
        once,
        tuple(ranks),
        entries,
        vsd,
        remote,
    )
