"""Metadata-only views of a VirtualStateDict: summaries, key tables, provenance and dry-run plans.

Nothing here reads tensor data: everything is computed from the safetensors headers and the
resolved :class:`~lazysd.plan.Plan`. The pieces, each reachable from a ``VirtualStateDict``:

* ``repr(vsd)`` / ``vsd._repr_html_()``: family, path, counts, bytes, dtype mix and the first
  keys (:func:`summary_text`, :func:`summary_html`), bounded however many keys there are.
* ``vsd.select(...)``: keys by glob, regex, layer or module kind (:func:`select`).
* ``vsd.summarize(by=...)``: keys, parameters and bytes per layer and/or kind (:func:`summarize`).
* ``vsd.explain(key, ep=...)``: which HF tensors, files and byte ranges make one native tensor,
  how it is transformed, and which bytes each rank reads (:func:`explain`).
* ``vsd.rank_plan(ep, ...)``: a dry-run load plan, bytes each rank reads (:func:`rank_plan`).

Parallel layouts (the NeMo Automodel expert-parallel convention):

* ``ep``: routed-expert tensors (``Entry.kind == "experts"``) are ``Shard(0)`` over ``ep``
  ranks, contiguous expert ranges. When ``ep`` does not divide the expert count the split
  follows DTensor's ``Shard(0)`` (``torch.chunk``): ``ceil(E / ep)`` experts per rank, the
  last ranks get fewer, possibly none.
* ``ep_shard``: a second mesh dim that also shards experts on native dim 1 (FSDP over
  experts, placements ``[Shard(1) on ep_shard, Shard(0) on ep]``). The mesh is
  ``(ep_shard, ep)``, row-major: ``rank = ep_shard_rank * ep + ep_rank``.
* every other tensor (attention, norms, routers, shared experts, embeddings, head) is read
  whole by every rank (replicated), unless ``fsdp=True``: then it is ``Shard(0)`` over all
  ``ep * ep_shard`` ranks (``torch.chunk`` semantics, like FSDP2's default).

Byte counts of plans are bytes read from disk (source dtype, exactly what
:class:`~lazysd.reader.Reader` reads for those boxes: both use
:func:`lazysd.reader.source_box` and :func:`lazysd.reader._runs`); summaries count the native
tensors' bytes (after a ``dtype=`` cast).
"""

from __future__ import annotations

import fnmatch
import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import MissingKeyError, PlacementError, ShapeMismatchError
from .plan import Box, Entry, Source
from .plan import _dtype_name as dtype_name
from .reader import _runs, source_box
from .rules import KINDS

if TYPE_CHECKING:
    from .checkpoint import TensorInfo
    from .virtual import VirtualStateDict

#: Rows of the key table in ``repr(vsd)`` and ``vsd._repr_html_()``.
REPR_KEYS = 8
HTML_KEYS = 20
#: Label of keys outside any decoder layer (embeddings, final norm, head).
GLOBAL = "-"


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(key: str) -> str:
    """Layer label of a native key: ``'3'``, ``'mtp.0'`` for MTP layers, ``'-'`` outside layers.

    Example:
        >>> layer_of("model.layers.3.moe.gate.weight"), layer_of("mtp.layers.0.eh_proj.weight"), layer_of("lm_head.weight")
        ('3', 'mtp.0', '-')
    """
    m = _LAYER.search(key)
    if m is None:
        return GLOBAL
    return f"mtp.{m.group(1)}" if key.startswith("mtp.") else m.group(1)


def _native_nbytes(vsd: VirtualStateDict, e: Entry) -> int:
    return e.numel * vsd.dtype_of(e).itemsize


def _bytes_text(n: int) -> str:
    """``'4.0 KiB (4,096 B)'``, or ``'512 B'`` when that is already exact."""
    return human_bytes(n) if n < 1024 else f"{human_bytes(n)} ({n:,} B)"


def _box_text(box: Box) -> str:
    return "[" + ", ".join(f"{lo}:{hi}" for lo, hi in box) + "]"


# ---- summaries and key tables ---------------------------------------------------------------
def summary_lines(vsd: VirtualStateDict) -> list[str]:
    """Family, path, key count, parameters, bytes and dtype mix."""
    entries = vsd.plan.entries.values()
    params = sum(e.numel for e in entries)
    nbytes = sum(_native_nbytes(vsd, e) for e in entries)
    lines = [
        f"VirtualStateDict(family={vsd.adapter.name!r}, path={str(vsd.checkpoint.path)!r})",
        f"  {len(vsd)} native keys from {len(vsd.checkpoint.tensors)} HF tensors in {len(vsd.checkpoint.files)} file(s)",
        f"  {params:,} parameters, {human_bytes(nbytes)} ({_dtype_mix(vsd, entries, nbytes)})",
    ]
    if vsd.plan.ignored:
        lines.append(f"  {len(vsd.plan.ignored)} HF tensors not exposed (e.g. MTP layers; include_mtp=True shows them)")
    return lines


def _dtype_mix(vsd: VirtualStateDict, entries: Iterable[Entry], nbytes: int) -> str:
    mix: Counter[str] = Counter()
    for e in entries:
        mix[dtype_name(vsd.dtype_of(e))] += _native_nbytes(vsd, e)
    return ", ".join(f"{d} {100 * b / max(nbytes, 1):.1f}%" for d, b in mix.most_common())


def _source_text(e: Entry) -> str:
    srcs = e.hf_keys
    if srcs == (e.key,):
        return "(same key)"
    return srcs[0] if len(srcs) == 1 else f"{srcs[0]} + {len(srcs) - 1} more"


def key_table(vsd: VirtualStateDict, limit: int | None = 20, *, keys: Iterable[str] | None = None) -> list[str]:
    """One line per native key: shape, dtype, bytes, HF sources; at most ``limit`` lines + '... K more'."""
    keys = list(vsd if keys is None else keys)
    shown = keys if limit is None else keys[:limit]
    width = max((len(k) for k in shown), default=0)
    lines = []
    for key in shown:
        e = vsd.plan.entries[key]
        dtype = vsd.dtype_of(e)
        lines.append(
            f"{key:<{width}}  {list(e.shape)!s:<18} {dtype_name(dtype):<9} {human_bytes(_native_nbytes(vsd, e)):>10}  <- {_source_text(e)}"
        )
    if limit is not None and len(keys) > limit:
        lines.append(f"... {len(keys) - limit} more")
    return lines


def summary_text(vsd: VirtualStateDict, limit: int = REPR_KEYS) -> str:
    """``repr(vsd)``: :func:`summary_lines` and the first ``limit`` keys."""
    return "\n".join(summary_lines(vsd) + ["  " + line for line in key_table(vsd, limit)])


def _html_key_rows(vsd: VirtualStateDict, keys: list[str], limit: int) -> str:
    rows = []
    for key in keys[:limit]:
        e = vsd.plan.entries[key]
        dtype = vsd.dtype_of(e)
        rows.append(
            f"<tr><td><code>{html.escape(key)}</code></td><td>{list(e.shape)}</td><td>{dtype_name(dtype)}</td>"
            f"<td style='text-align:right'>{human_bytes(_native_nbytes(vsd, e))}</td><td><code>{html.escape(_source_text(e))}</code></td></tr>"
        )
    more = f"<tr><td colspan='5'>... {len(keys) - limit} more</td></tr>" if len(keys) > limit else ""
    head = "<tr><th>key</th><th>shape</th><th>dtype</th><th>bytes</th><th>HF sources</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}{more}</tbody></table>"


def summary_html(vsd: VirtualStateDict, limit: int = HTML_KEYS) -> str:
    """``vsd._repr_html_()``: the summary, bytes per module kind and the first ``limit`` keys.

    Its size depends on ``limit`` and the number of kinds, not on the number of keys.
    """
    lines = summary_lines(vsd)
    head = f"<b>VirtualStateDict</b> <code>{html.escape(vsd.adapter.name)}</code> &middot; <code>{html.escape(str(vsd.checkpoint.path))}</code>"
    body = "".join(f"<br>{html.escape(line.strip())}" for line in lines[1:])
    return (
        f"<div class='lazysd-vsd'>{head}{body}"
        f"<details><summary>by module kind</summary>{summarize(vsd, by='kind')._repr_html_()}</details>"
        f"{_html_key_rows(vsd, list(vsd), limit)}</div>"
    )


# ---- selecting and grouping -----------------------------------------------------------------
def select(
    vsd: VirtualStateDict,
    pattern: str | None = None,
    *,
    regex: str | None = None,
    layer: int | str | Iterable[int | str] | None = None,
    kind: str | Iterable[str] | None = None,
) -> Selection:
    """The native keys matching every given filter, as a read-only :class:`Selection`.

    Args:
        pattern: shell glob over the whole key (``fnmatch``, case-sensitive).
        regex: regular expression searched in the key (``re.search``).
        layer: layer index or label (:func:`layer_of`: ``3``, ``"mtp.0"``, ``"-"``), or several.
        kind: module kind(s) of :data:`lazysd.rules.KINDS` (``"experts"``, ``"attention"``, ...).

    Example:
        >>> sel = vsd.select("*.moe.experts.*", layer=range(3, 6))    # doctest: +SKIP
        >>> len(sel), sel.summarize(by="kind")                        # doctest: +SKIP
    """
    layers: set[str] | None = None
    if layer is not None:
        items = [layer] if isinstance(layer, (int, str)) else list(layer)
        layers = {str(x) for x in items}
    kinds: set[str] | None = None
    if kind is not None:
        kinds = {kind} if isinstance(kind, str) else set(kind)
        unknown = sorted(kinds - set(KINDS))
        if unknown:
            raise ValueError(f"unknown module kind(s) {unknown}; kinds are {list(KINDS)}")
    compiled = re.compile(regex) if regex is not None else None
    keys = tuple(
        key
        for key, e in vsd.plan.entries.items()
        if (pattern is None or fnmatch.fnmatchcase(key, pattern))
        and (compiled is None or compiled.search(key) is not None)
        and (layers is None or layer_of(key) in layers)
        and (kinds is None or e.kind in kinds)
    )
    return Selection(vsd, keys)


class Selection(Mapping[str, torch.Tensor]):
    """Some keys of a VirtualStateDict: a read-only Mapping with the same lazy values.

    Usable wherever a state dict is (``model.load_state_dict(sel, strict=False)``) and in
    notebooks, where it shows a bounded key table.
    """

    def __init__(self, vsd: VirtualStateDict, keys: tuple[str, ...]) -> None:
        self.vsd = vsd
        self.keys_ = keys
        self._set = frozenset(keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise MissingKeyError(f"{self.vsd.checkpoint.path}: {key!r} is not in this selection of {len(self)} keys")
        return self.vsd[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    @property
    def nbytes(self) -> int:
        """Bytes of the selected native tensors."""
        return sum(_native_nbytes(self.vsd, self.vsd.plan.entries[k]) for k in self.keys_)

    def summarize(self, by: str | tuple[str, ...] = "kind") -> Summary:
        """:func:`summarize` over the selected keys."""
        return summarize(self.vsd, by=by, keys=self.keys_)

    def _head(self) -> str:
        params = sum(self.vsd.plan.entries[k].numel for k in self.keys_)
        return f"Selection({len(self)} of {len(self.vsd)} keys, {params:,} parameters, {human_bytes(self.nbytes)})"

    def __repr__(self) -> str:
        return "\n".join([self._head()] + ["  " + line for line in key_table(self.vsd, REPR_KEYS, keys=self.keys_)])

    def _repr_html_(self) -> str:
        return f"<div class='lazysd-sel'>{html.escape(self._head())}{_html_key_rows(self.vsd, list(self.keys_), HTML_KEYS)}</div>"


@dataclass(frozen=True)
class SummaryRow:
    """One group of keys."""

    group: tuple[str, ...]  # one label per ``Summary.by`` field, e.g. ("3", "experts")
    keys: int  # native keys in the group
    params: int  # elements
    nbytes: int  # bytes of the native tensors (after a dtype= cast)


@dataclass(frozen=True)
class Summary:
    """Keys, parameters and bytes per group, in the order groups first appear in the keys."""

    by: tuple[str, ...]  # "layer" and/or "kind"
    rows: tuple[SummaryRow, ...]

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    def as_dict(self) -> dict[tuple[str, ...], int]:
        """Group -> bytes."""
        return {r.group: r.nbytes for r in self.rows}

    def _table(self) -> list[list[str]]:
        total = max(self.nbytes, 1)
        return [
            [*r.group, str(r.keys), f"{r.params:,}", human_bytes(r.nbytes), f"{100 * r.nbytes / total:.1f}%"]
            for r in self.rows
        ]

    def __str__(self) -> str:
        header = [*self.by, "keys", "parameters", "bytes", "share"]
        rows = [header, *self._table()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        left = len(self.by)
        return "\n".join(
            "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows
        )

    def _repr_html_(self) -> str:
        header = "".join(f"<th>{h}</th>" for h in [*self.by, "keys", "parameters", "bytes", "share"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._table())
        return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def summarize(vsd: VirtualStateDict, by: str | tuple[str, ...] = "kind", *, keys: Iterable[str] | None = None) -> Summary:
    """Keys, parameters and bytes grouped by ``"layer"`` (:func:`layer_of`), ``"kind"``, or both.

    Example:
        >>> print(vsd.summarize(by="kind"))                        # doctest: +SKIP
        kind           keys  parameters       bytes  share
        embedding         1       2,048     4.0 KiB   3.0%
        ...
    """
    fields = (by,) if isinstance(by, str) else tuple(by)
    if not fields or any(f not in ("layer", "kind") for f in fields):
        raise ValueError(f"by must be 'layer', 'kind' or a tuple of them, got {by!r}")
    groups: dict[tuple[str, ...], list[int]] = {}
    for key in vsd if keys is None else keys:
        e = vsd.plan.entries[key]
        label = {"layer": layer_of(key), "kind": e.kind}
        acc = groups.setdefault(tuple(label[f] for f in fields), [0, 0, 0])
        acc[0] += 1
        acc[1] += e.numel
        acc[2] += _native_nbytes(vsd, e)
    rows = [SummaryRow(g, *acc) for g, acc in groups.items()]
    if fields == ("kind",):  # the canonical kind order reads better than first appearance
        rows.sort(key=lambda r: KINDS.index(r.group[0]))
    return Summary(fields, tuple(rows))


# ---- reads of one box -----------------------------------------------------------------------
@dataclass(frozen=True)
class SourceRead:
    """The part of one HF tensor that one box of a native tensor reads."""

    hf_key: str
    file: Path
    src_box: tuple[tuple[int, int], ...]  # in the HF tensor's own dims, [lo, hi)
    nbytes: int  # bytes read from the file (with FP8 block scales, if any)
    runs: int  # contiguous byte ranges of the tensor data
    info: TensorInfo = field(repr=False, compare=False)

    def ranges(self) -> list[tuple[int, int]]:
        """Absolute ``[start, end)`` file offsets of the tensor data read, in order.

        Computed on demand: a sharded expert tensor can be many thousands of ranges.
        """
        return [(self.info.offset + s, self.info.offset + s + n) for s, n in _runs(self.info.shape, self.info.itemsize, list(self.src_box))]


def _run_count(shape: tuple[int, ...], src_box: list[tuple[int, int]]) -> int:
    """``len(_runs(shape, _, src_box))`` without listing them (mirrors ``_runs``' merging)."""
    k = len(shape) - 1
    while k > 0 and src_box[k] == (0, shape[k]):
        k -= 1
    return math.prod(hi - lo for lo, hi in src_box[:k]) if k > 0 else 1


def _scale_bytes(src: Source, src_box: list[tuple[int, int]], chunk_bytes: int) -> int:
    """Bytes of FP8 block scales the reader reads for ``src_box``: per row chunk, like the reader."""
    scale = getattr(src, "scale", None)
    if scale is None:
        return 0
    b0, b1 = src.block
    (r0, r1), (c0, c1) = src_box
    row_bytes = 4 * (c1 - c0)  # the reader stages dequantized chunks in fp32
    per = max(1, chunk_bytes // max(1, row_bytes))
    cols = -(-c1 // b1) - c0 // b1
    total = 0
    for r in range(r0, r1, per):
        hi = min(r + per, r1)
        total += (-(-hi // b0) - r // b0) * cols * scale.itemsize
    return total


def box_reads(entry: Entry, box: Box, chunk_bytes: int = 8 << 20) -> tuple[SourceRead, ...]:
    """What reading ``box`` of ``entry`` reads, source by source (none for an empty box)."""
    if any(lo >= hi for lo, hi in box):
        return ()
    out = []
    for src in entry.sources:
        overlap = source_box(src, box)
        if overlap is None:
            continue
        sb, _ = overlap
        info = src.info
        nbytes = info.itemsize * math.prod(hi - lo for lo, hi in sb) + _scale_bytes(src, sb, chunk_bytes)
        out.append(SourceRead(info.key, info.file, tuple(sb), nbytes, _run_count(info.shape, sb), info))
    return tuple(out)


# ---- layouts --------------------------------------------------------------------------------
def chunk_range(n: int, parts: int, i: int) -> tuple[int, int]:
    """``[lo, hi)`` of chunk ``i`` of ``torch.chunk`` over ``n`` rows in ``parts`` (DTensor ``Shard``).

    Example:
        >>> [chunk_range(5, 4, i) for i in range(4)]
        [(0, 2), (2, 4), (4, 5), (5, 5)]
    """
    size = -(-n // parts)
    lo = min(i * size, n)
    return lo, min(lo + size, n)


@dataclass(frozen=True)
class Layout:
    """A dry-run parallel layout: ``ep`` x ``ep_shard`` ranks (see the module docstring)."""

    ep: int = 1  # expert-parallel ranks: experts Shard(0)
    ep_shard: int = 1  # experts additionally Shard(1) over this many ranks
    fsdp: bool = False  # non-expert tensors Shard(0) over all ranks instead of replicated

    def __post_init__(self) -> None:
        for name in ("ep", "ep_shard"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise PlacementError(f"{name} must be a positive integer, got {value!r}")

    @property
    def world(self) -> int:
        return self.ep * self.ep_shard

    def coords(self, rank: int) -> tuple[int, int]:
        """``(ep_rank, ep_shard_rank)`` of a rank of the row-major ``(ep_shard, ep)`` mesh."""
        return rank % self.ep, rank // self.ep

    def box(self, entry: Entry, rank: int) -> Box:
        """The box of ``entry`` that ``rank`` holds (and reads)."""
        shape = entry.shape
        full = [(0, s) for s in shape]
        if entry.kind == "experts":
            ep_rank, shard_rank = self.coords(rank)
            full[0] = chunk_range(shape[0], self.ep, ep_rank)
            if self.ep_shard > 1:
                full[1] = chunk_range(shape[1], self.ep_shard, shard_rank)
        elif self.fsdp and shape:
            full[0] = chunk_range(shape[0], self.world, rank)
        return tuple(full)

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


def _check_tiling(vsd: VirtualStateDict, entry: Entry) -> None:
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
            f"{vsd.checkpoint.path}: sources of {entry.key} ({', '.join(entry.hf_keys[:3])}) cover {covered} of its {entry.numel} elements"
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
    layout: Layout | None
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
                f"    {s.hf_key}  {list(s.shape)} {dtype_name(s.dtype)}  {s.file.name} bytes [{s.start}, {s.end})  -> native {_box_text(s.native_block)}"
            )
        if len(self.sources) > 8:
            lines.append(f"    ... {len(self.sources) - 8} more")
        if self.layout is not None:
            if self.kind == "experts":
                lines.append(f"  layout: {self.layout.describe(self.shape[0])}")
            else:
                how = f"Shard(0) over all {self.layout.world} ranks" if self.layout.fsdp else "replicated, every rank reads it whole"
                lines.append(f"  layout: {self.layout.mesh} ({self.kind} tensor: {how})")
            for first, last, r in self._rank_groups():
                who = f"rank {first}" if first == last else f"ranks {first}-{last}"
                lines.append(f"    {who}: box {_box_text(r.box)}, {_bytes_text(r.nbytes)} in {r.runs} range(s)")
                for read in r.reads[:4]:
                    lines.append(f"      {read.hf_key}  {read.file.name}  {_ranges_text(read)}")
                if len(r.reads) > 4:
                    lines.append(f"      ... {len(r.reads) - 4} more sources")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return f"<pre class='lazysd-explain'>{html.escape(str(self))}</pre>"


def explain(vsd: VirtualStateDict, key: str, layout: Layout | None = None) -> Explanation:
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
            RankRead(r, *layout.coords(r), (b := layout.box(entry, r)), box_reads(entry, b, chunk)) for r in range(layout.world)
        )
    return Explanation(entry.key, entry.kind, entry.shape, vsd.dtype_of(entry), entry.source_dtype, entry.transform, spans, layout, ranks)


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
    """A dry-run load: bytes each rank of a :class:`Layout` reads, from headers alone.

    Built by :func:`rank_plan` after checking every planned tensor (sources tile it exactly;
    the layout applies to it), so a bad mapping fails here, before any tensor byte is read.
    """

    path: Path
    layout: Layout
    keys: tuple[str, ...]
    num_experts: int | None  # routed experts per MoE layer (None: no expert tensors)
    checkpoint_bytes: int  # bytes of all planned tensors read once (what ep=1 reads)
    ranks: tuple[RankPlan, ...]
    _entries: tuple[Entry, ...] = field(repr=False, compare=False)
    _chunk_bytes: int = field(repr=False, compare=False, default=8 << 20)
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
            if all(lo < hi for lo, hi in box):
                out[e.key] = box
        return out

    def reads(self, rank: int, key: str) -> tuple[SourceRead, ...]:
        """The exact reads of ``key`` on ``rank``; ``SourceRead.ranges()`` lists byte ranges."""
        entry = next((e for e in self._entries if e.key == key), None)
        if entry is None:
            raise MissingKeyError(f"{self.path}: no native key {key!r} in this plan of {len(self.keys)} keys")
        return box_reads(entry, self.layout.box(entry, rank), self._chunk_bytes)

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
            f"  {len(self.keys)} keys checked from headers; {human_bytes(self.checkpoint_bytes)} ({self.checkpoint_bytes:,} B) to read once",
            f"  {'rank':>4}  {'experts':<9} {'bytes':>16}  {'human':>10}  {'ranges':>7}  {'experts share':>13}",
        ]
        if self.remote:
            out[-1] += f"  {'GETs':>7}"
        for r in self.ranks:
            experts = "-" if r.experts is None else f"{r.experts[0]}:{r.experts[1]}"
            share = f"{100 * r.by_kind.get('experts', 0) / max(r.nbytes, 1):.1f}%"
            out.append(f"  {r.rank:>4}  {experts:<9} {r.nbytes:>16,}  {human_bytes(r.nbytes):>10}  {r.runs:>7,}  {share:>13}")
            if self.remote:
                out[-1] += f"  {r.requests:>7,}"
        if self.remote:
            out.append(f"  all ranks: {sum(r.requests for r in self.ranks):,} ranged GET requests (after coalescing)")
        out.append(
            f"  all ranks: {human_bytes(self.total_bytes)} ({self.total_bytes / max(self.checkpoint_bytes, 1):.2f}x the checkpoint); "
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
            f"<div class='lazysd-plan'>{head}<table><thead><tr><th>rank</th><th>experts</th><th>bytes</th><th></th><th>ranges</th></tr></thead>"
            f"<tbody>{rows}{more}</tbody></table>{foot}</div>"
        )


def rank_plan(vsd: VirtualStateDict, layout: Layout, *, keys: Iterable[str] | None = None) -> LoadPlan:
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
    cache: dict[tuple[str, Box], tuple[SourceRead, ...]] = {}
    remote = not vsd.checkpoint.local
    gets: dict[tuple[str, Box], int] = {}
    for rank in range(layout.world):
        by_kind: Counter[str] = Counter()
        by_layer: Counter[str] = Counter()
        nbytes = runs = requests = 0
        for e in entries:
            box = layout.box(e, rank)
            reads = cache.get((e.key, box))
            if reads is None:
                reads = cache[(e.key, box)] = box_reads(e, box, chunk)
            n = sum(r.nbytes for r in reads)
            nbytes += n
            runs += sum(r.runs for r in reads)
            by_kind[e.kind] += n
            by_layer[layer_of(e.key)] += n
            if remote:
                if (e.key, box) not in gets:
                    gets[(e.key, box)] = vsd.reader.request_count(e, box) if n else 0
                requests += gets[(e.key, box)]
        ep_rank, shard_rank = layout.coords(rank)
        held = chunk_range(num_experts, layout.ep, ep_rank) if num_experts is not None else None
        ranks.append(RankPlan(rank, ep_rank, shard_rank, held, nbytes, runs, dict(by_kind), dict(by_layer), requests))
    once = sum(sum(r.nbytes for r in box_reads(e, tuple((0, s) for s in e.shape), chunk)) for e in entries)
    return LoadPlan(vsd.checkpoint.path, layout, tuple(e.key for e in entries), num_experts, once, tuple(ranks), entries, chunk, remote)
