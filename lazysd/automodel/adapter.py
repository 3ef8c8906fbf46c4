"""``Step3p5StateDictAdapter``: NeMo Automodel's Step3p5 adapter API, run by lazysd's rules (see :mod:`lazysd.automodel`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..adapters import known
from ..checkpoint import TensorInfo
from ..errors import MissingSourceError, PlacementError, ShapeMismatchError
from ..export.view import HFEntry, HFView, clip, map_placements
from ..export.view import local_box as dtensor_box
from ..geometry import Box, full_box
from ..lazy import LazyTensor, is_dtensor
from ..plan import Entry, resolve
from ..reader import Reader, to_native
from ..reverse import extract
from ..rules import Pattern, Rule, claim
from ..transpose import copy_into
from .dtensors import create_dtensor_from_local_or_reference, ep_layout, rank_box

__all__ = ["Step3p5StateDictAdapter"]

_ADAPTER = known()["step3p5"]
# Per-layer keys, with the prefixes the public adapter accepts; rules are written for "model.".
_LAYER_KEY = re.compile(r"(?P<prefix>(?:model\.)?(?:language_model\.)?)(?P<rest>layers\.(?:0|[1-9][0-9]*)\..+)")
_LEGACY_ROUTER_BIAS = Pattern("model.layers.{layer}.moe.gate.bias")
_IN_MEMORY = Path("hf_state_dict")  # stands for the file of tensors given in memory


# ---- keys --------------------------------------------------------------------------------
def _canonical(key: str) -> tuple[str, str] | None:
    """``"layers.3.x"`` -> ``("", "model.layers.3.x")``: the prefix and the key the rules use."""
    m = _LAYER_KEY.fullmatch(key)
    return (m.group("prefix"), "model." + m.group("rest")) if m else None


def _with_prefix(prefix: str, canonical_key: str) -> str:
    return prefix + canonical_key.removeprefix("model.")


def _transforms(rule: Rule) -> bool:
    """Whether a rule changes tensors (rather than passing one through, renamed or not)."""
    return len(rule.parts) > 1 or any(p.dims is not None for p in rule.parts)



# ---- write-through loading ---------------------------------------------------------------
def _writable_alias(value: Any) -> bool:
    """Whether ``value`` is real tensor memory a DCP load can write into (not a LazyTensor)."""
    if not isinstance(value, torch.Tensor):
        return False
    local = value._local_tensor if is_dtensor(value) else value
    return not isinstance(local, LazyTensor)


def _fill_view(view: torch.Tensor, value: Any) -> bool:
    """Whether ``value`` is now in ``view`` (a write-through value ``to_hf`` handed out).

    The load wrote straight into ``view`` when ``value`` is it; a value put in its place (a
    loader that allocated its own destination) is copied into it, so nothing is rebuilt. A
    value of another shape or kind is left to the ordinary conversion.
    """
    if value is view:
        return True
    if not isinstance(value, torch.Tensor) or is_dtensor(value) != is_dtensor(view) or value.shape != view.shape:
        return False
    view.copy_(value)
    return True


def _check_split(fqn: str, rule: Rule, tensor: Any, view: HFView) -> None:
    """Refuse a DTensor whose local shard does not split into HF shards (no collective here)."""
    for entry in view.entries.values():
        if map_placements(entry.piece, tuple(tensor.shape), tensor.placements) is None:
            raise PlacementError(
                f"{fqn} is placed {tuple(tensor.placements)}: its local shard does not split into shards of "
                f"{entry.key} (a shard of dim {rule.cat_dim}, where gate and up are concatenated, cannot be split)"
            )


def _alias(native: torch.Tensor, entry: HFEntry) -> torch.Tensor:
    """HF tensor ``entry`` as a view of ``native`` (of its local shard for a DTensor): no copy."""
    if not is_dtensor(native):
        return extract(native, entry.piece)
    placements = map_placements(entry.piece, tuple(native.shape), native.placements)
    box, origin = dtensor_box(native)
    sub, _ = clip(entry.piece, box)
    local = extract(native.to_local(), sub, origin=origin)
    return create_dtensor_from_local_or_reference(local, native, placements_override=tuple(placements), global_shape=entry.shape)  # type: ignore[arg-type]



# ---- in-memory plans ---------------------------------------------------------------------
def _stored(value: Any) -> tuple[TensorInfo, Reader] | None:
    """The stored tensor and reader behind a LazyTensor of one whole tensor as stored, if any."""
    if not isinstance(value, LazyTensor) or len(value.entry.sources) != 1:
        return None
    src = value.entry.sources[0]
    if not src.identity or src.scale is not None or tuple(value.box) != full_box(src.info.shape):
        return None
    return src.info, value._reader


def _info(key: str, value: Any) -> TensorInfo:
    """Header of an in-memory tensor (global shape for a DTensor)."""
    return TensorInfo(key, _IN_MEMORY / key, value.dtype, tuple(value.shape), 0)


def _view_of(entry: Entry, box: Box, values: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The ``box`` of a one-source ``entry`` as a view of its in-memory source, else None.

    ``down_projs`` is ``down_proj`` sliced to this rank's rows and transposed: no copy is
    needed, and NeMo Automodel's adapter makes none either.
    """
    if len(entry.sources) != 1:
        return None
    src = entry.sources[0]
    found = src.source_region(box)
    if found is None or tuple(found[1]) != tuple(box):
        return None
    src_box = found[0]
    return to_native(values[src.info.key][tuple(slice(a, b) for a, b in src_box)], src.dims)


def _fill_from(entry: Entry, box: Box, values: dict[str, torch.Tensor], dest: torch.Tensor) -> torch.Tensor:
    """Copy the ``box`` of ``entry`` out of in-memory sources into ``dest``.

    Each source is sliced before it is permuted, so with a mesh only this rank's rows are copied.
    Transposed blocks go through lazysd's transpose kernel (several times torch's strided copy).
    """
    for src in entry.sources:
        found = src.source_region(box)
        if found is None:
            continue
        src_box, native = found
        block = to_native(values[src.info.key][tuple(slice(a, b) for a, b in src_box)], src.dims)
        copy_into(dest[tuple(slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(native, box))], block)
    return dest



# ---- the adapter -------------------------------------------------------------------------
class Step3p5StateDictAdapter:
    """Converts between HF Step3p5 checkpoints and Automodel's grouped-experts native format.

    Args:
        config: the model config; stored, not read.
        moe_config: read for ``n_routed_experts`` and ``moe_inter_dim`` (both optional checks).
        backend: stored, not read.
        dtype: dtype of converted expert tensors (other tensors keep theirs).

    Example:
        >>> adapter = Step3p5StateDictAdapter(config, moe_config, backend, dtype=torch.bfloat16)  # doctest: +SKIP
        >>> native = adapter.from_hf(HFCheckpointView("/ckpt/Step-3.5-Flash"), device_mesh=mesh)  # doctest: +SKIP
        >>> model.load_state_dict(native, strict=False)         # reads this rank's experts only  # doctest: +SKIP
        >>> hf = adapter.to_hf(model.state_dict())                                                # doctest: +SKIP
    """

    #: ``to_hf(..., for_checkpoint_load=True)`` returns views of the model's tensors that a DCP
    #: load writes straight into; ``from_hf`` recognises them and rebuilds nothing.
    supports_write_through_checkpoint_load = True
    #: The name NeMo Automodel 0.7's Checkpointer reads for the same promise (no full copy).
    supports_low_memory_dcp_load = True

    def __init__(self, config: Any, moe_config: Any, backend: Any, dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.moe_config = moe_config
        self.backend = backend
        self.dtype = dtype
        # HF key -> (value aliasing the model, native key) that to_hf handed out for a load.
        self._load_views: dict[str, tuple[torch.Tensor, str]] = {}
        self._view_loaded: set[str] = set()
        #: True while :func:`~lazysd.automodel.use_lazysd_reader` loads through its native route:
        #: ``to_hf(..., for_checkpoint_load=True)`` then hands the native state dict over as it is.
        self.native_checkpoint_load = False

    @property
    def checkpoint_key_aliases(self) -> dict[str, str]:
        """Legacy HF names accepted on load (read by Automodel's Checkpointer): none."""
        return {}

    @property
    def view_loaded_native_keys(self) -> set[str]:
        """Native keys the last :meth:`from_hf` found already loaded in place (write-through).

        They are left out of its result: the model holds their data. Automodel's Checkpointer
        counts them as loaded when it compares the result with the model's keys.
        """
        return set(self._view_loaded)

    def iter_checkpoint_load_parts(self, model_state_dict: Mapping[str, Any], device_mesh: Any = None) -> None:
        """None: Step3p5 checkpoints load in one DCP pass (Automodel's part-by-part hook)."""
        return

    def get_hf_state_dict_keys(self, state_dict: Mapping[str, Any]) -> list[str]:
        """The HF keys :meth:`to_hf` gives for ``state_dict``, from shapes only (no data)."""
        meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
        return list(self.to_hf(meta, exclude_key_regex=r".*_extra_state.*"))

    # ---- HF -> native --------------------------------------------------------------------
    def from_hf(self, hf_state_dict: Mapping[str, Any], device_mesh: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Convert any subset of an HF Step3p5 state dict to native keys.

        Gate and up of a layer become ``gate_and_up_projs`` ``[E, D, 2I]``, down becomes
        ``down_projs`` ``[E, I, D]``, both cast to ``dtype``; ``router_bias`` is renamed
        ``gate.e_score_correction_bias``; every other key passes through unchanged. Keys may
        carry ``model.``, ``model.language_model.`` or no prefix; the output keeps it.

        Memory as in Automodel's adapter, never more: ``down_projs`` of a plain tensor or a
        DTensor is a transposed view of ``down_proj`` (rows sliced to this rank's experts
        with a mesh), copied only to change dtype; ``gate_and_up_projs`` is one new tensor.
        Keys whose values :meth:`to_hf` handed out with ``for_checkpoint_load=True`` (and a
        DCP load then filled in place) are recognised: their native keys are left out of the
        result and listed in :attr:`view_loaded_native_keys`, nothing is rebuilt (a value put
        in place of a handed-out view is copied into it, the model's memory).

        Args:
            hf_state_dict: HF keys to plain tensors, DTensors (e.g. from a DCP load: they
                keep their mesh, with Shard(1)/Shard(2) swapped across the transpose) or
                lazy values (e.g. :class:`HFCheckpointView`: outputs stay lazy).
            device_mesh: with plain or lazy values, expert outputs become DTensors holding
                only this rank's block (see :func:`create_dtensor_from_local_or_reference`).
            **kwargs: accepted for compatibility, unused.

        Raises:
            MissingSourceError: a layer's gate without its up, or the reverse.
            ShapeMismatchError: parts disagree in shape or dtype, or the expert count is not
                ``moe_config.n_routed_experts``.
            PlacementError: DTensor parts that cannot be combined locally.
        """
        out: dict[str, Any] = {}
        # (prefix, rule index, placeholder values) -> part index -> (HF key, value)
        groups: dict[tuple[str, int, tuple[tuple[str, str], ...]], dict[int, tuple[str, Any]]] = {}
        self._view_loaded = set()
        for key, value in hf_state_dict.items():
            handed = self._load_views.pop(key, None)
            if handed is not None and _fill_view(handed[0], value):
                # A to_hf(for_checkpoint_load=True) key: the load wrote through its view into the model.
                self._view_loaded.add(handed[1])
                continue
            found = self._claim(key)
            if found is None:
                out[key] = value
                continue
            prefix, ri, pi, values = found
            rule = _ADAPTER.rules[ri]
            if not _transforms(rule):  # a rename (router_bias)
                out[_with_prefix(prefix, rule.native_pattern.format(**values))] = value
                continue
            group = (prefix, ri, tuple(sorted(values.items())))
            if group not in groups:
                out[_with_prefix(prefix, rule.native_pattern.format(**values))] = None  # keep input order
            groups.setdefault(group, {})[pi] = (key, value)
        for (prefix, ri, bindings), parts in groups.items():
            rule = _ADAPTER.rules[ri]
            native_key = _with_prefix(prefix, rule.native_pattern.format(**dict(bindings)))
            out[native_key] = self._build(native_key, rule, dict(bindings), parts, device_mesh)
        return out

    def _claim(self, key: str) -> tuple[str, int, int, dict[str, str]] | None:
        split = _canonical(key)
        if split is None:
            return None
        prefix, canonical = split
        found = claim(_ADAPTER.rules, canonical, transforming_only=True)
        if found is None:
            return None
        return prefix, found.rule, found.part, dict(found.values) | ({} if found.expert is None else {"expert": str(found.expert)})

    def _build(self, native_key: str, rule: Rule, values: dict[str, str], parts: dict[int, tuple[str, Any]], mesh: Any) -> Any:
        given = [k for k, _ in parts.values()]
        prefix = _canonical(given[0])[0]  # type: ignore[index]
        for pi, part in enumerate(rule.sources):
            if pi not in parts:
                wanted = _with_prefix(prefix, part.pattern.format(**values))
                raise MissingSourceError(
                    f"hf_state_dict: {given[0]} has no matching {wanted}; {native_key} is built from both, "
                    "so they must be converted in the same from_hf call"
                )
        tensors = {k: v for k, v in parts.values()}
        dtensors = [k for k, v in tensors.items() if is_dtensor(v)]
        stored = {k: _stored(v) for k, v in tensors.items()}
        readers = {id(s[1]) for s in stored.values() if s is not None}
        lazy = all(s is not None for s in stored.values()) and len(readers) == 1 and not dtensors
        if lazy:
            first = next(iter(stored.values()))
            reader = first[1]  # type: ignore[index]
            infos = {_canonical(k)[1]: s[0] for k, s in stored.items()}  # type: ignore[index]
            where = reader.ckpt.path
        else:
            infos = {_canonical(k)[1]: _info(k, v) for k, v in tensors.items()}  # type: ignore[index]
            where = _IN_MEMORY
        entry = next(iter(resolve(_ADAPTER, {}, infos, where=where).entries.values()))
        entry = replace(entry, key=native_key)
        self._check_experts(entry, rule)

        if dtensors:
            return self._build_dtensor(entry, rule, tensors, dtensors)
        if mesh is None:
            submesh, placements, box = None, (), full_box(entry.shape)
        else:
            submesh, placements = ep_layout(mesh)
            box = rank_box(entry.shape, submesh, placements)
        if lazy:
            local: torch.Tensor = LazyTensor(entry, reader, box, dtype=self.dtype, device=torch.device("cpu"))
        else:
            local = _view_of(entry, box, tensors)  # keyed as the sources: _info(k, v).key == k
            if local is not None:
                local = local.to(self.dtype)  # a view when the dtype is kept, as Automodel's transpose
            else:
                dest = torch.empty(tuple(hi - lo for lo, hi in box), dtype=self.dtype, device=next(iter(tensors.values())).device)
                local = _fill_from(entry, box, tensors, dest)
        if submesh is None:
            return local
        return create_dtensor_from_local_or_reference(local, None, submesh, placements_override=placements, global_shape=entry.shape)

    def _check_experts(self, entry: Entry, rule: Rule) -> None:
        n = getattr(self.moe_config, "n_routed_experts", None)
        if rule.kind == "experts" and isinstance(n, int) and entry.shape[0] != n:
            raise ShapeMismatchError(
                f"{entry.sources[0].info.key} has {entry.shape[0]} experts on dim 0 (shape "
                f"{list(entry.sources[0].info.shape)}) but moe_config.n_routed_experts is {n}"
            )

    def _build_dtensor(self, entry: Entry, rule: Rule, tensors: dict[str, Any], dtensors: list[str]) -> torch.Tensor:
        """Combine DTensor parts shard by shard, keeping their mesh and moving their placements."""
        from torch.distributed.tensor import Shard

        if len(dtensors) != len(tensors):
            plain = [k for k in tensors if k not in dtensors]
            raise PlacementError(f"hf_state_dict: {dtensors[0]} is a DTensor but {plain[0]} is not; {entry.key} needs both alike")
        ref = tensors[dtensors[0]]
        for k in dtensors[1:]:
            t = tensors[k]
            if t.device_mesh != ref.device_mesh or tuple(t.placements) != tuple(ref.placements):
                raise PlacementError(
                    f"hf_state_dict: {k} is placed {t.placements} on {t.device_mesh} but {dtensors[0]} is placed "
                    f"{ref.placements} on {ref.device_mesh}; {entry.key} needs them placed alike"
                )
        dims = entry.sources[0].dims
        native_placements = []
        for p in ref.placements:
            if isinstance(p, Shard):
                d = dims.index(p.dim)
                if len(rule.sources) > 1 and d == rule.cat_dim:
                    raise PlacementError(
                        f"hf_state_dict: {dtensors[0]} is sharded on dim {p.dim}, which becomes the gate|up "
                        f"dim {d} of {entry.key}; local shards cannot be concatenated there"
                    )
                native_placements.append(Shard(d))
            else:
                native_placements.append(p)
        # No part is sharded on the cat dim, so each local shard covers the same native
        # rows of every part: permuting and concatenating the local shards is exact.
        blocks = [tensors[src.info.key].to_local().permute([d for d in src.dims if d is not None]) for src in entry.sources]
        # One part stays a view of its local shard (down_projs), as in Automodel's adapter.
        local = torch.cat(blocks, dim=rule.cat_dim) if len(blocks) > 1 else blocks[0]
        local = local.to(self.dtype)
        return create_dtensor_from_local_or_reference(local, ref, placements_override=tuple(native_placements), global_shape=entry.shape)

    # ---- native -> HF --------------------------------------------------------------------
    def to_hf(
        self,
        state_dict: Mapping[str, Any],
        exclude_key_regex: str | None = None,
        quantization: bool = False,
        *,
        for_checkpoint_load: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Convert a native state dict (plain tensors, DTensors or LazyTensors) to HF keys.

        Output keys matching ``exclude_key_regex`` (``re.match``, i.e. anchored at the start)
        are left out. ``quantization`` is accepted and ignored: Step3p5 has no quantized
        export. DTensors stay DTensors on the same mesh.

        For saving (the default) HF expert tensors are contiguous copies. With
        ``for_checkpoint_load=True`` (what NeMo Automodel's Checkpointer passes before a DCP
        load) every value aliases the tensor it came from: ``gate_proj``/``up_proj`` are
        transposed views of the two halves of ``gate_and_up_projs``, ``down_proj`` a transposed
        view of ``down_projs`` (for DTensors, of the local shard, wrapped as an HF-shaped DTensor
        with the shard dims moved through the transpose), other keys the native tensor itself.
        A DCP load into the result writes checkpoint bytes straight into the parameters, and
        :meth:`from_hf` then recognises those values and rebuilds nothing.

        Example:
            >>> hf = adapter.to_hf(model.state_dict(), exclude_key_regex=r".*_extra_state")  # doctest: +SKIP
            >>> sd = adapter.to_hf(model.state_dict(), for_checkpoint_load=True)            # doctest: +SKIP
            >>> dcp.load(sd, storage_reader=HuggingFaceStorageReader(path))  # fills the model  # doctest: +SKIP
            >>> adapter.from_hf(sd)                 # {}: everything was loaded in place      # doctest: +SKIP
        """
        hf: dict[str, Any] = {}
        for fqn, tensor in state_dict.items():
            if for_checkpoint_load and self.native_checkpoint_load:
                # lazysd's native DCP route (use_lazysd_reader): the reader serves native keys.
                pairs = [] if exclude_key_regex and re.match(exclude_key_regex, fqn) else [(fqn, tensor)]
            else:
                pairs = self.convert_single_tensor_to_hf(
                    fqn, tensor, exclude_key_regex=exclude_key_regex, quantization=quantization, for_checkpoint_load=for_checkpoint_load, **kwargs
                )
            for key, value in pairs:
                hf[key] = value
                if for_checkpoint_load and _writable_alias(value):
                    self._load_views[key] = (value, fqn)
        return hf

    def convert_single_tensor_to_hf(self, fqn: str, tensor: Any, **kwargs: Any) -> list[tuple[str, Any]]:
        """Convert one native tensor to its ``(HF key, tensor)`` pairs.

        Keys no rule transforms come back unchanged. ``exclude_key_regex`` (keyword) drops
        output keys it ``re.match``-es; ``for_checkpoint_load=True`` (keyword) gives views
        aliasing ``tensor`` instead of contiguous copies (see :meth:`to_hf`).

        Example:
            >>> [k for k, _ in adapter.convert_single_tensor_to_hf("model.layers.3.moe.experts.gate_and_up_projs", w)]  # doctest: +SKIP
            ['model.layers.3.moe.gate_proj.weight', 'model.layers.3.moe.up_proj.weight']
        """
        exclude = kwargs.get("exclude_key_regex")
        result = self._convert_native_to_hf(fqn, tensor, views=bool(kwargs.get("for_checkpoint_load")))
        if result is None:
            result = [(fqn, tensor)]
        if exclude:
            result = [(k, v) for k, v in result if not re.match(exclude, k)]
        return result

    def _convert_native_to_hf(self, fqn: str, tensor: torch.Tensor, *, views: bool = False) -> list[tuple[str, torch.Tensor]] | None:
        """HF pairs for native expert tensors and the router bias; None for other keys.

        ``gate_and_up_projs`` ``[E, D, 2I]`` -> ``gate_proj``, ``up_proj`` ``[E, I, D]``;
        ``down_projs`` ``[E, I, D]`` -> ``down_proj`` ``[E, D, I]``;
        ``gate.e_score_correction_bias`` and legacy ``gate.bias`` -> ``router_bias``.
        DTensors stay DTensors with their shard dims moved through the transpose. With
        ``views``, expert values are views of ``tensor`` (of its local shard for a DTensor)
        rather than contiguous copies; a LazyTensor is always converted to a copy.
        """
        split = _canonical(fqn)
        if split is None:
            return None
        prefix, canonical = split
        legacy = _LEGACY_ROUTER_BIAS.match(canonical)
        if legacy is not None:
            return [(_with_prefix(prefix, f"model.layers.{legacy['layer']}.moe.router_bias"), tensor)]
        found = _ADAPTER.native_rule(canonical)
        if found is None or not found[0].parts:
            return None
        rule, values = found
        if not _transforms(rule):
            return [(_with_prefix(prefix, rule.parts[0].pattern.format(**values)), tensor)]
        self._check_inter(fqn, rule, tuple(tensor.shape))
        # HF keys, pieces and values from export's HFView: the rules run backwards, once.
        view = HFView({canonical: tensor}, adapter=_ADAPTER)
        if is_dtensor(tensor):
            _check_split(fqn, rule, tensor, view)
        if views and _writable_alias(tensor):
            return [(_with_prefix(prefix, key), _alias(tensor, entry)) for key, entry in view.entries.items()]
        return [(_with_prefix(prefix, key), view[key]) for key in view]

    def _check_inter(self, fqn: str, rule: Rule, shape: tuple[int, ...]) -> None:
        inter = getattr(self.moe_config, "moe_inter_dim", None)
        if len(rule.sources) > 1 and isinstance(inter, int) and shape[rule.cat_dim] != len(rule.sources) * inter:
            raise ShapeMismatchError(
                f"{fqn} has shape {list(shape)}: dim {rule.cat_dim} should be {len(rule.sources)} x "
                f"moe_config.moe_inter_dim={inter}"
            )
