"""The engine: run an adapter's rules over a checkpoint's headers and produce a Plan.

A :class:`Plan` maps each native key to an :class:`Entry`: its shape and dtype, and the HF
tensors (:class:`Source`) that fill it, each with the block of native coordinates it
occupies and how its dimensions are permuted into them. Everything here is computed from
headers; reading is :mod:`lazysd.reader`'s job. Validation happens once, here, before any
tensor byte is read: every key claimed, every part present, shapes and dtypes compatible.

Shape legend for comments: E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .checkpoint import config_value
from .errors import (
    ConfigError,
    MissingSourceError,
    OptionError,
    ShapeMismatchError,
    UnclaimedKeyError,
    UnsupportedFormatError,
    cut,
)
from .fp8 import FP8_DTYPES, BlockScales
from .geometry import Block
from .header import TensorInfo
from .rules import Adapter, Pattern, Rule, claim

FP8Mode = Literal["dequantize", "keep"]


@dataclass(frozen=True)
class Source(Block):
    """One HF tensor placed into a native tensor: a :class:`~lazysd.geometry.Block` whose
    shape is the HF tensor's.

    Built with keywords: ``Source(info=..., start=..., dims=...)``.
    """

    shape: tuple[int, ...] = field(init=False)  # = info.shape
    info: TensorInfo
    # FP8 inverse block scales that the reader multiplies in while reading (fp8="dequantize");
    # None for plain tensors.
    scale: BlockScales | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", self.info.shape)


@dataclass(frozen=True)
class Entry:
    """A native tensor: what it is and where its bytes come from."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # native dtype (a rule's fixed dtype, else the sources')
    sources: tuple[Source, ...]
    rule: Rule = field(repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def source_dtype(self) -> torch.dtype:
        return self.sources[0].info.dtype

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return tuple(s.info.key for s in self.sources)

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def transform(self) -> str:
        """A short human description of how the sources become this tensor."""
        steps = []
        src = self.sources[0]
        if any(d is None for d in src.dims):
            steps.append(
                f"stack {len(self.sources) // max(1, len(self.rule.sources))} experts on dim {src.dims.index(None)}"
            )
        perm = tuple(d for d in src.dims if d is not None)
        if perm != tuple(sorted(perm)):
            steps.append(f"permute{perm}")
        if len(self.rule.sources) > 1:
            steps.append(f"cat {len(self.rule.sources)} parts on dim {self.rule.cat_dim}")
        if self.dtype != self.source_dtype:
            steps.append(f"cast {dtype_name(self.source_dtype)}->{dtype_name(self.dtype)}")
        return ", ".join(steps) or "unchanged"


@dataclass(frozen=True)
class Plan:
    """The resolved mapping of a checkpoint: native key -> Entry, plus what was set aside."""

    adapter: Adapter
    entries: dict[str, Entry]
    ignored: dict[str, str]  # HF key -> why it is not exposed
    num_layers: int | None  # main decoder layers; larger layer indices are MTP layers


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``'bfloat16'``."""
    return str(dtype).removeprefix("torch.")


# ASCII digits only: str.isdigit() and \d also accept "²" or "٣", which int() refuses or
# reads as another number.
_NUM = re.compile(r"([0-9]+)")


def natural_key(key: str) -> tuple[Any, ...]:
    """Sort key that puts ``layers.2`` before ``layers.10``.

    Numbers and text alternate in the tuple (text at even positions), so any two keys compare.

    Example:
        >>> sorted(["a.10", "a.2", "a.1\u00b2"], key=natural_key)
        ['a.1²', 'a.2', 'a.10']
    """
    return tuple(int(t) if i % 2 else t for i, t in enumerate(_NUM.split(key)))


def resolve(
    adapter: Adapter,
    config: Mapping[str, Any],
    headers: Mapping[str, TensorInfo],
    *,
    where: str | os.PathLike[str] = "<memory>",
    include_mtp: bool = False,
    fp8: FP8Mode = "dequantize",
    fp8_dtype: torch.dtype = torch.bfloat16,
) -> Plan:
    """Run ``adapter`` over HF tensor headers and their config.

    Any HF-keyed source can be resolved: a :class:`~lazysd.checkpoint.Checkpoint`
    (``resolve(adapter, ckpt.config, ckpt.tensors, where=ckpt.path)``), in-memory tensors
    described by :class:`~lazysd.checkpoint.TensorInfo` s, a remote store's headers.

    Args:
        adapter: the model family's rules.
        config: the model's config.json contents.
        headers: HF key -> where and what that tensor is (dtype, shape, file, offset).
        where: names the source in error messages (a checkpoint directory).
        include_mtp: expose MTP layers (layer index >= the main layer count).
        fp8: block-scaled FP8 weights with companions (``adapter.scale_suffix``):
            ``"dequantize"`` makes them ``fp8_dtype`` tensors whose sources carry their scales
            (the reader multiplies only the scale blocks it reads); ``"keep"`` exposes the FP8
            tensor as stored plus its scales under ``<native key>_scale_inv`` (fp32), built
            with the same stacking, permutation and concatenation as the weight, block-wise.
        fp8_dtype: the dtype of dequantized FP8 weights.

    Raises:
        UnsupportedFormatError: keys in a format the adapter refuses (e.g. MXFP4).
        UnclaimedKeyError: HF keys no rule claims and the adapter does not ignore.
        MissingSourceError: a native tensor lacks one of its parts or experts.
        ShapeMismatchError: parts of one native tensor disagree in shape or dtype.
        ConfigError: config.json disagrees with the tensors.
    """
    if isinstance(where, (str, os.PathLike)):  # a remote checkpoint's path is its own path-like object
        where = Path(where)
    if adapter.text_config and isinstance(config.get(adapter.text_config), dict):
        config = {**config, **config[adapter.text_config]}
    num_layers = config_value(config, *adapter.num_layers)
    if num_layers is not None and (type(num_layers) is not int or num_layers < 0):
        raise ConfigError(
            f"{where / 'config.json'}: {adapter.num_layers[0]} must be a non-negative integer, got {num_layers!r}"
        )
    _check_layers(adapter, config, where, headers, num_layers)

    if fp8 not in ("dequantize", "keep"):
        raise OptionError(f"fp8 must be 'dequantize' or 'keep', got {fp8!r}")
    _check_refused(adapter, where, headers)
    block = _scale_block(adapter, config, where)
    scale_of = adapter.scale_companions(headers)
    rules = adapter.rules
    if fp8 == "keep" and scale_of:
        rules = rules + adapter.scale_rules
    groups, ignored = _group_keys(adapter, where, headers, scale_of, keep_scales=fp8 == "keep")
    if fp8 == "keep":
        scale_of = {}

    entries: dict[str, Entry] = {}
    for (ri, bindings), parts in groups.items():
        rule = rules[ri]
        values = dict(bindings)
        native_key = rule.native_pattern.format(**values)
        entry = _build_entry(native_key, rule, values, parts, where, headers)
        if any(s.info.key in scale_of for s in entry.sources):
            entry = _with_scales(
                entry, {k: headers[scale_of[k]] for k in entry.hf_keys if k in scale_of}, block, fp8_dtype, where
            )
        elif fp8 == "dequantize":
            _check_scaled(entry, adapter)
        layer = int(values["layer"]) if "layer" in values else None
        if layer is not None and num_layers is not None and layer >= num_layers:
            if not include_mtp:
                for k in entry.hf_keys:
                    ignored[k] = (
                        f"MTP layer {layer} (>= {adapter.num_layers[0]}={num_layers}); pass include_mtp=True to expose "
                        "it"
                    )
                continue
            old = adapter.layer_pattern.format(layer=layer)
            new = adapter.mtp_pattern.format(index=layer - num_layers)
            entry = Entry(new + entry.key.removeprefix(old), entry.shape, entry.dtype, entry.sources, entry.rule)
        entries[entry.key] = entry

    entries = {k: entries[k] for k in sorted(entries, key=natural_key)}
    _check_config(adapter, config, where, entries)
    _check_expert_counts(where, entries)
    return Plan(adapter, entries, ignored, num_layers)


# (rule index, native bindings) -> part index -> expert (or None) -> TensorInfo
Groups = dict[tuple[int, tuple[tuple[str, str], ...]], dict[int, dict[int | None, TensorInfo]]]


def _group_keys(
    adapter: Adapter, where: Path, headers: Mapping[str, TensorInfo], scale_of: dict[str, str], *, keep_scales: bool
) -> tuple[Groups, dict[str, str]]:
    """Claim every HF key: grouped by the native tensor it builds, or ignored, else an error.

    FP8 scale companions are claimed with their weight (``fp8="dequantize"``) or, with
    ``keep_scales``, by the adapter's scale rules only (indices after ``adapter.rules``): a
    catch-all rule at the end of ``adapter.rules`` must not see companions first.
    """
    groups: Groups = {}
    ignored: dict[str, str] = {}
    unclaimed: list[str] = []
    companions = set(scale_of.values())
    for key, info in headers.items():
        if key in companions and not keep_scales:
            continue  # claimed with its weight
        if key in companions:
            found = claim(adapter.scale_rules, key)
            found = found and replace(found, rule=found.rule + len(adapter.rules))
        else:
            found = claim(adapter.rules, key)
        if found is not None:
            group = groups.setdefault((found.rule, found.values), {})
            group.setdefault(found.part, {})[found.expert] = info
        elif adapter.ignores(key):
            ignored[key] = f"ignored by the {adapter.name} adapter"
        else:
            unclaimed.append(key)
    if unclaimed:
        listed = "\n".join(f"  {k}  ({headers[k].file.name})" for k in unclaimed[:30])
        more = f"\n  ... {len(unclaimed) - 30} more" if len(unclaimed) > 30 else ""
        raise UnclaimedKeyError(
            f"{where}: {len(unclaimed)} checkpoint key(s) match no rule of the {adapter.name} adapter:\n{listed}{more}"
        )
    return groups, ignored


def _check_refused(adapter: Adapter, where: Path, headers: Mapping[str, TensorInfo]) -> None:
    for pattern, why in adapter.refuse:
        refused = Pattern(pattern)
        hits = [k for k in headers if refused.match(k) is not None]
        if hits:
            shown = ", ".join(f"{k} ({headers[k].file.name})" for k in hits[:4])
            more = f" ... {len(hits) - 4} more" if len(hits) > 4 else ""
            raise UnsupportedFormatError(f"{where}: the {adapter.name} adapter does not convert {shown}{more}: {why}")


def _scale_block(adapter: Adapter, config: Mapping[str, Any], where: Path) -> tuple[int, int]:
    """FP8 scale block shape: config.json's ``quantization_config.weight_block_size``, else the adapter's."""
    block = config_value(config, "quantization_config.weight_block_size") or adapter.scale_block
    if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(type(b) is int and b > 0 for b in block):
        raise ConfigError(
            f"{where / 'config.json'}: quantization_config.weight_block_size must be two positive integers, got "
            f"{block!r}"
        )
    return (block[0], block[1])


def _check_parts(
    native_key: str,
    rule: Rule,
    values: dict[str, str],
    parts: dict[int, dict[int | None, TensorInfo]],
    where: Path,
    headers: Mapping[str, TensorInfo],
) -> None:
    """Every part of ``rule`` is present, and per-expert parts have the same experts 0..n-1."""
    found = [info.key for by_expert in parts.values() for info in by_expert.values()]
    for pi, part in enumerate(rule.sources):
        if pi not in parts:
            wanted = part.pattern.format(**values, expert="{expert}")
            shown = ", ".join(f"{k} ({headers[k].file.name})" for k in found[:4])
            raise MissingSourceError(f"{where}: {native_key} needs {wanted} but the checkpoint has only {shown}")

    expert_sets = {pi: sorted(by_expert) for pi, by_expert in parts.items() if rule.sources[pi].per_expert}
    if expert_sets:
        n_experts = max(max(s) for s in expert_sets.values()) + 1
        for pi, experts in expert_sets.items():
            # Sorted distinct indices >= 0 are exactly 0..n-1 iff there are n of them; the
            # missing ones are listed from the gaps, bounded by the keys present (an expert
            # index in a key may be 10**12).
            if len(experts) != n_experts:
                n_missing = n_experts - len(experts)
                missing = [e for a, b in _gaps(experts, n_experts)[:8] for e in range(a, min(b, a + 7) + 1)][:8]
                wanted = [cut(rule.sources[pi].pattern.format(**values, expert=e)) for e in missing]
                raise MissingSourceError(
                    f"{where}: {native_key} has experts 0..{n_experts - 1} in some parts but these are missing: "
                    f"{', '.join(wanted)}"
                    + (f" ... {n_missing - len(missing)} more" if n_missing > len(missing) else "")
                )


def _build_entry(
    native_key: str,
    rule: Rule,
    values: dict[str, str],
    parts: dict[int, dict[int | None, TensorInfo]],
    where: Path,
    headers: Mapping[str, TensorInfo],
) -> Entry:
    _check_parts(native_key, rule, values, parts, where, headers)

    # Place each source: per-expert sources stack on their None dim, parts concatenate.
    sources: list[Source] = []
    dtypes: dict[torch.dtype, str] = {}
    offset = 0
    block_shape: tuple[int, ...] | None = None
    block_key = ""
    for pi, part in enumerate(rule.sources):
        by_expert = parts[pi]
        infos = [by_expert[e] for e in sorted(by_expert, key=lambda e: -1 if e is None else e)]
        dims, extent = _part_extent(native_key, rule, part.dims, infos, where)
        stack_dim = dims.index(None) if None in dims else None
        if block_shape is not None:
            others = [s for i, s in enumerate(extent) if i != rule.cat_dim]
            expected = [s for i, s in enumerate(block_shape) if i != rule.cat_dim]
            if others != expected:
                raise ShapeMismatchError(
                    f"{where}: {native_key} cannot combine {block_key} {list(parts[0][next(iter(parts[0]))].shape)} "
                    f"({parts[0][next(iter(parts[0]))].file.name}) with {infos[0].key} {list(infos[0].shape)} "
                    f"({infos[0].file.name}): shapes disagree outside the concatenation dim"
                )
        else:
            block_shape, block_key = tuple(extent), infos[0].key
        concat = len(rule.sources) > 1
        if concat and rule.cat_dim >= len(dims):
            raise ShapeMismatchError(
                f"{infos[0].file}, key {cut(infos[0].key)!r}: has shape {list(infos[0].shape)}, which the "
                f"{rule.native!r} rule "
                f"cannot concatenate on dim {rule.cat_dim}"
            )
        for n, info in enumerate(infos):
            dtypes.setdefault(info.dtype, info.key)
            start = [0] * len(dims)  # empty for a 0-dim (scalar) tensor
            if concat:
                start[rule.cat_dim] = offset
            if stack_dim is not None:
                start[stack_dim] += n
            sources.append(Source(info=info, start=tuple(start), dims=dims))
        if concat:
            offset += extent[rule.cat_dim]
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} is {dtype_name(d)}" for d, k in dtypes.items())
        raise ShapeMismatchError(f"{where}: {native_key} cannot combine sources of different dtypes: {listing}")
    assert block_shape is not None
    shape = list(block_shape)
    if len(rule.sources) > 1:
        shape[rule.cat_dim] = offset
    return Entry(native_key, tuple(shape), rule.dtype or next(iter(dtypes)), tuple(sources), rule)


def _part_extent(
    native_key: str, rule: Rule, part_dims: tuple[int | None, ...] | None, infos: list[TensorInfo], where: Path
) -> tuple[tuple[int | None, ...], list[int]]:
    """A part's dims (``None``: the expert stacking dim) and its extent in the native tensor.

    Its sources (one per expert, or one) must share one shape, of the rank its dims place.
    """
    first = infos[0]
    if len({i.shape for i in infos}) > 1:
        listing = ", ".join(f"{i.key} {list(i.shape)}" for i in infos if i.shape != first.shape)
        raise ShapeMismatchError(
            f"{where}: experts of {native_key} differ in shape: {first.key} {list(first.shape)} vs {listing}"
        )
    dims = part_dims if part_dims is not None else tuple(range(len(first.shape)))
    used = sorted(d for d in dims if d is not None)
    if used != list(range(len(first.shape))):
        raise ShapeMismatchError(
            f"{first.file}, key {first.key!r}: has shape {list(first.shape)}, which the {rule.native!r} rule "
            f"cannot place with dims {dims} (expected a {len(used)}-d tensor)"
        )
    return dims, [len(infos) if d is None else first.shape[d] for d in dims]


def _check_scaled(entry: Entry, adapter: Adapter) -> None:
    """An FP8 tensor read with fp8="dequantize" must have its scales: without them its values
    are off by the scale (~100x for DeepSeek-V3), and a cast into a bf16 parameter would not say so."""
    bare = next((s.info for s in entry.sources if s.info.dtype in FP8_DTYPES), None)
    if bare is None:
        return
    companion = f"{cut(bare.key)}{adapter.scale_suffix}" if adapter.scale_suffix else "a block-scale companion"
    raise MissingSourceError(
        f"{bare.file}, key {cut(bare.key)!r}: FP8 {dtype_name(bare.dtype)} weight without its scales ({companion!r} "
        f'is not in the checkpoint), so it cannot be dequantized; pass fp8="keep" to read the FP8 values as stored'
    )


def _with_scales(
    entry: Entry, scales: dict[str, TensorInfo], block: tuple[int, int], dtype: torch.dtype, where: Path
) -> Entry:
    """Attach each FP8 source's scale companion (validated) and make the entry ``dtype``."""
    sources = []
    for src in entry.sources:
        info, scale = src.info, scales.get(src.info.key)
        if scale is None:
            raise ShapeMismatchError(
                f"{where}: {entry.key} mixes block-scaled FP8 sources ({next(iter(scales))}) with "
                f"{info.key} ({info.file.name}), which has no scale companion"
            )
        decode = BlockScales(scale, block)
        wrong = decode.mismatch(info)
        if wrong is not None:
            raise ShapeMismatchError(f"{scale.file}, key {scale.key!r}: {wrong}")
        sources.append(replace(src, scale=decode))
    return replace(entry, sources=tuple(sources), dtype=entry.rule.dtype or dtype)


def _check_config(adapter: Adapter, config: Mapping[str, Any], where: Path, entries: dict[str, Entry]) -> None:
    where = where / "config.json"
    for check in adapter.checks:
        value = config_value(config, *check.fields)
        if value is None:
            continue
        pattern = Pattern(check.key)
        for entry in entries.values():
            if (
                pattern.match(entry.key) is not None
                and len(entry.shape) > check.dim
                and entry.shape[check.dim] != value
            ):
                raise ConfigError(
                    f"{where}: {check.fields[0]}={value!r} but {entry.key} (from {', '.join(entry.hf_keys[:2])} in "
                    f"{entry.sources[0].info.file.name}) has {entry.shape[check.dim]} on dim {check.dim}, shape "
                    f"{list(entry.shape)}"
                )


#: config.json fields holding the number of MTP layers stored after the main ones.
MTP_LAYER_FIELDS = ("num_nextn_predict_layers",)


def _span(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0..2, 5'``: layer lists stay short in messages."""
    runs: list[list[int]] = []
    for n in layers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return _span_runs([(a, b) for a, b in runs])


def _span_runs(runs: list[tuple[int, int]]) -> str:
    """Inclusive runs ``[(0, 2), (5, 5)]`` -> ``'0..2, 5'``."""
    text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs[:12])
    return text + (" ..." if len(runs) > 12 else "")


def _gaps(present: list[int], n: int) -> list[tuple[int, int]]:
    """Inclusive runs of ``0..n-1`` missing from sorted ``present``, in O(len(present))."""
    gaps, expect = [], 0
    for layer in present:
        if layer >= n:
            break
        if layer > expect:
            gaps.append((expect, layer - 1))
        expect = layer + 1
    if expect < n:
        gaps.append((expect, n - 1))
    return gaps


def _check_layers(
    adapter: Adapter, config: Mapping[str, Any], where: Path, headers: Mapping[str, TensorInfo], num_layers: int | None
) -> None:
    """The layer indices in the tensors agree with config.json's layer counts.

    Every main layer ``0..num_hidden_layers-1`` must be present; layers after them are MTP
    layers, at most ``num_nextn_predict_layers`` of them (checkpoints that drop MTP layers
    are fine). Otherwise layers would be misnamed as MTP layers, or silently missing.
    """
    where = where / "config.json"
    prefix = adapter.layer_pattern.regex
    layers = {int(m.group("layer")) for k in headers if (m := prefix.match(k)) is not None}
    present = sorted(layers)
    if not present or num_layers is None:
        return
    main_field = adapter.num_layers[0]
    # Work bounded by the layers present, not by the config's number (it may be 10**18).
    gaps = _gaps(present, num_layers)
    if gaps:
        raise ConfigError(
            f"{where}: {main_field}={num_layers} but the tensors have {len(present)} layer(s), {_span(present)}; "
            f"missing main layers {_span_runs(gaps)}"
        )
    mtp_field = next((f for f in MTP_LAYER_FIELDS if config_value(config, f) is not None), None)
    if mtp_field is None:
        return
    num_mtp = config_value(config, mtp_field)
    if type(num_mtp) is not int or num_mtp < 0:
        raise ConfigError(f"{where}: {mtp_field} must be a non-negative integer, got {num_mtp!r}")
    beyond = [n for n in present if n >= num_layers + num_mtp]
    if beyond:
        raise ConfigError(
            f"{where}: {main_field}={num_layers} + {mtp_field}={num_mtp} = {num_layers + num_mtp} layers, "
            f"but the tensors have {len(present)} layer(s), {_span(present)} (layers {_span(beyond)} are beyond both)"
        )


def _check_expert_counts(where: Path, entries: dict[str, Entry]) -> None:
    """Routed-expert tensors of every layer have the same number of experts (dim 0)."""
    counts: dict[int, list[str]] = {}
    for entry in entries.values():
        if entry.kind == "experts" and entry.shape:
            counts.setdefault(entry.shape[0], []).append(entry.key)
    if len(counts) > 1:
        listing = "; ".join(
            f"{n} experts: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            for n, keys in sorted(counts.items())
        )
        raise ShapeMismatchError(f"{where}: expert counts differ between layers: {listing}")
