"""Metadata-only views of a VirtualStateDict: summaries, key tables and selections.

Nothing here reads tensor data: everything is computed from the safetensors headers and the
resolved :class:`~lazysd.plan.Plan`. The pieces, each reachable from a ``VirtualStateDict``:

* ``repr(vsd)`` / ``vsd._repr_html_()``: family, path, counts, bytes, dtype mix and the first
  keys (:func:`summary_text`, :func:`summary_html`), bounded however many keys there are.
* ``vsd.select(...)``: keys by glob, regex, layer or module kind (:func:`select`).
* ``vsd.summarize(by=...)``: keys, parameters and bytes per layer and/or kind (:func:`summarize`).

Provenance and dry-run load plans (``vsd.explain``, ``vsd.rank_plan``) are in
:mod:`lazysd.dryrun`. Summaries count the native tensors' bytes (after a ``dtype=`` cast).

The functions take any object with the few attributes of :class:`Planned` (a
``VirtualStateDict`` is one), so this module never imports :mod:`lazysd.virtual`.
"""

from __future__ import annotations

import fnmatch
import html
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from .checkpoint import Checkpoint
from .errors import MissingKeyError, OptionError
from .plan import Entry, Plan, dtype_name
from .reader import Reader
from .rules import KINDS, Adapter


class Planned(Protocol):
    """What these views need of a state dict: a ``Mapping`` of native keys over a plan.

    :class:`~lazysd.VirtualStateDict` is one.
    """

    plan: Plan
    adapter: Adapter
    checkpoint: Checkpoint
    reader: Reader
    device: torch.device

    def __getitem__(self, key: str) -> torch.Tensor: ...
    def __iter__(self) -> Iterator[str]: ...
    def __len__(self) -> int: ...
    def entry(self, key: str) -> Entry: ...
    def dtype_of(self, entry: Entry) -> torch.dtype: ...


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


_LAYER = re.compile(r"(?:^|\.)layers\.([0-9]+)\.")


def layer_of(key: str) -> str:
    """Layer label of a native key: ``'3'``, ``'mtp.0'`` for MTP layers, ``'-'`` outside layers.

    Example:
        >>> keys = "model.layers.3.moe.gate.weight", "mtp.layers.0.eh_proj.weight", "lm_head.weight"
        >>> tuple(layer_of(k) for k in keys)
        ('3', 'mtp.0', '-')
    """
    m = _LAYER.search(key)
    if m is None:
        return GLOBAL
    return f"mtp.{m.group(1)}" if key.startswith("mtp.") else m.group(1)


def _native_nbytes(vsd: Planned, e: Entry) -> int:
    return e.numel * vsd.dtype_of(e).itemsize


def bytes_text(n: int) -> str:
    """``'4.0 KiB (4,096 B)'``, or ``'512 B'`` when that is already exact."""
    return human_bytes(n) if n < 1024 else f"{human_bytes(n)} ({n:,} B)"


# ---- summaries and key tables ---------------------------------------------------------------
def summary_lines(vsd: Planned) -> list[str]:
    """Family, path, key count, parameters, bytes and dtype mix."""
    entries = vsd.plan.entries.values()
    params = sum(e.numel for e in entries)
    nbytes = sum(_native_nbytes(vsd, e) for e in entries)
    lines = [
        f"VirtualStateDict(family={vsd.adapter.name!r}, path={str(vsd.checkpoint.path)!r})",
        f"  {len(vsd)} native keys from {len(vsd.checkpoint.tensors)} HF tensors in {len(vsd.checkpoint.files)} "
        "file(s)",
        f"  {params:,} parameters, {human_bytes(nbytes)} ({_dtype_mix(vsd, entries, nbytes)})",
    ]
    if vsd.plan.ignored:
        lines.append(f"  {len(vsd.plan.ignored)} HF tensors not exposed (e.g. MTP layers; include_mtp=True shows them)")
    return lines


def _dtype_mix(vsd: Planned, entries: Iterable[Entry], nbytes: int) -> str:
    mix: Counter[str] = Counter()
    for e in entries:
        mix[dtype_name(vsd.dtype_of(e))] += _native_nbytes(vsd, e)
    return ", ".join(f"{d} {100 * b / max(nbytes, 1):.1f}%" for d, b in mix.most_common())


def _source_text(e: Entry) -> str:
    srcs = e.hf_keys
    if srcs == (e.key,):
        return "(same key)"
    return srcs[0] if len(srcs) == 1 else f"{srcs[0]} + {len(srcs) - 1} more"


def key_table(vsd: Planned, limit: int | None = 20, *, keys: Iterable[str] | None = None) -> list[str]:
    """One line per native key: shape, dtype, bytes, HF sources; at most ``limit`` lines + '... K more'."""
    keys = list(vsd if keys is None else keys)
    shown = keys if limit is None else keys[:limit]
    width = max((len(k) for k in shown), default=0)
    lines = []
    for key in shown:
        e = vsd.plan.entries[key]
        dtype = vsd.dtype_of(e)
        lines.append(
            f"{key:<{width}}  {str(list(e.shape)):<18} {dtype_name(dtype):<9} "
            f"{human_bytes(_native_nbytes(vsd, e)):>10}  <- {_source_text(e)}"
        )
    if limit is not None and len(keys) > limit:
        lines.append(f"... {len(keys) - limit} more")
    return lines


def summary_text(vsd: Planned, limit: int = REPR_KEYS) -> str:
    """``repr(vsd)``: :func:`summary_lines` and the first ``limit`` keys."""
    return "\n".join(summary_lines(vsd) + ["  " + line for line in key_table(vsd, limit)])


def _html_key_rows(vsd: Planned, keys: list[str], limit: int) -> str:
    rows = []
    for key in keys[:limit]:
        e = vsd.plan.entries[key]
        dtype = vsd.dtype_of(e)
        rows.append(
            f"<tr><td><code>{html.escape(key)}</code></td><td>{list(e.shape)}</td><td>{dtype_name(dtype)}</td>"
            f"<td style='text-align:right'>{human_bytes(_native_nbytes(vsd, e))}</td>"
            f"<td><code>{html.escape(_source_text(e))}</code></td></tr>"
        )
    more = f"<tr><td colspan='5'>... {len(keys) - limit} more</td></tr>" if len(keys) > limit else ""
    head = "<tr><th>key</th><th>shape</th><th>dtype</th><th>bytes</th><th>HF sources</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}{more}</tbody></table>"


def summary_html(vsd: Planned, limit: int = HTML_KEYS) -> str:
    """``vsd._repr_html_()``: the summary, bytes per module kind and the first ``limit`` keys.

    Its size depends on ``limit`` and the number of kinds, not on the number of keys.
    """
    lines = summary_lines(vsd)
    head = (
        f"<b>VirtualStateDict</b> <code>{html.escape(vsd.adapter.name)}</code> &middot; "
        f"<code>{html.escape(str(vsd.checkpoint.path))}</code>"
    )
    body = "".join(f"<br>{html.escape(line.strip())}" for line in lines[1:])
    return (
        f"<div class='lazysd-vsd'>{head}{body}"
        f"<details><summary>by module kind</summary>{summarize(vsd, by='kind')._repr_html_()}</details>"
        f"{_html_key_rows(vsd, list(vsd), limit)}</div>"
    )


# ---- selecting and grouping -----------------------------------------------------------------
def select(
    vsd: Planned,
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
            raise OptionError(f"unknown module kind(s) {unknown}; kinds are {list(KINDS)}")
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

    def __init__(self, vsd: Planned, keys: tuple[str, ...]) -> None:
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
        rows = _html_key_rows(self.vsd, list(self.keys_), HTML_KEYS)
        return f"<div class='lazysd-sel'>{html.escape(self._head())}{rows}</div>"


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
            "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows
        )

    def _repr_html_(self) -> str:
        header = "".join(f"<th>{h}</th>" for h in [*self.by, "keys", "parameters", "bytes", "share"])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._table())
        return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def summarize(vsd: Planned, by: str | tuple[str, ...] = "kind", *, keys: Iterable[str] | None = None) -> Summary:
    """Keys, parameters and bytes grouped by ``"layer"`` (:func:`layer_of`), ``"kind"``, or both.

    Example:
        >>> print(vsd.summarize(by="kind"))                        # doctest: +SKIP
        kind           keys  parameters       bytes  share
        embedding         1       2,048     4.0 KiB   3.0%
        ...
    """
    fields = (by,) if isinstance(by, str) else tuple(by)
    if not fields or any(f not in ("layer", "kind") for f in fields):
        raise OptionError(f"by must be 'layer', 'kind' or a tuple of them, got {by!r}")
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
