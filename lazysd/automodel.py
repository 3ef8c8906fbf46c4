"""A drop-in ``Step3p5StateDictAdapter`` for NeMo Automodel users, run by lazysd's engine.

Change one import and keep the training code::

    # from nemo_automodel.components.models.step3p5.state_dict_adapter import Step3p5StateDictAdapter
    from lazysd.automodel import Step3p5StateDictAdapter

The class and the two module functions keep the public signatures of NeMo Automodel's Step3p5
state-dict adapter. Conversions are not hand-written loops: the Step3p5 rules of
:mod:`lazysd.adapters` say which HF tensors make which native tensor, :func:`lazysd.plan.resolve`
turns them into plan entries, and :mod:`lazysd.reverse` runs them backwards for ``to_hf``.

Layouts (E experts, D hidden, I expert intermediate)::

    HF                                         native
    model.layers.L.moe.gate_proj.weight [E,I,D] \\
    model.layers.L.moe.up_proj.weight   [E,I,D]  > model.layers.L.moe.experts.gate_and_up_projs [E,D,2I]
    model.layers.L.moe.down_proj.weight [E,D,I]  -> model.layers.L.moe.experts.down_projs       [E,I,D]
    model.layers.L.moe.router_bias      [E]      -> model.layers.L.moe.gate.e_score_correction_bias
    anything else                                -> same key, same tensor (MTP layers included)

Inside NeMo Automodel's own ``Checkpointer`` the swap pays off on both of its routes:

* its DCP route (several ranks): ``to_hf(..., for_checkpoint_load=True)`` returns HF-shaped
  views of the model's parameters (of DTensor local shards too), so DCP writes checkpoint bytes
  straight into the model, and ``from_hf`` recognises them and rebuilds nothing
  (``supports_write_through_checkpoint_load``);
* its single-process route: ``from_hf`` of the mapped checkpoint keeps ``down_projs`` a view,
  as Automodel's adapter does, and never allocates more than it.

:func:`use_lazysd_reader` adds the reader: one line makes the Checkpointer read through
:class:`lazysd.dcp.HFReader`, exact byte ranges, each rank only its shards, with no memory
beyond the model::

    use_lazysd_reader(checkpointer)
    checkpointer.load_base_model(model, device, root_dir, "/ckpt/Step-3.5-Flash")

Lazy by construction: when ``from_hf`` is given lazy values (:class:`HFCheckpointView`, or any
:class:`~lazysd.lazy.LazyTensor` of one whole stored tensor), expert tensors come back as
LazyTensors planned over the same files, so a loader that copies them into parameters reads
each byte once, straight into the parameter, and with a mesh only this rank's experts. Eager
dicts give plain tensors, converted by torch ops that the same plan entries drive.

Duck-typed arguments — the only attributes read:

* ``moe_config.n_routed_experts`` (optional): checked against dim 0 of every expert tensor,
  and the global expert count of EP-sharded outputs.
* ``moe_config.moe_inter_dim`` (optional): checked against the half-width of
  ``gate_and_up_projs`` in ``to_hf``.
* ``config`` and ``backend`` are stored (as ``self.config``/``self.backend``) and not read.

``quantization`` in ``to_hf``: accepted and ignored, as in the public adapter, which forwards
it and never reads it for Step3p5 (the release is bf16 with no scale tensors to emit).

Where this adapter knowingly differs from the public one, and why:

1. DTensors are built with an explicit global shape and stride (``DTensor.from_local(...,
   shape=, stride=)``), taken from the reference DTensor's sharded dims or from the plan.
   Inferring the global shape from the local shard (the public fallback) multiplies the local
   size by the mesh size, which is wrong for uneven splits (e.g. 10 experts over 4 ranks).
2. EP ranges follow DTensor's own ``Shard(0)`` split (``torch.chunk`` sizes, e.g. 10 experts
   over 4 ranks: 3,3,3,1), not the public "first ``E % n`` ranks take one more" rule (3,3,2,2).
   Both agree whenever ``E`` divides evenly; when they do not, only DTensor's split gives a
   DTensor whose ``full_tensor()`` and redistributions are correct and that matches
   parameters sharded by ``distribute_tensor`` (a trailing rank may then hold no experts,
   e.g. 5 over 4: 2,2,1,0).
3. On plain tensors with an ``ep_shard`` mesh dim of size > 1, the native dim 1 is sliced to
   this rank's ``Shard(1)`` piece too (older public versions slice only experts while still
   declaring ``Shard(1)``, doubling dim 1 of the global shape). Uneven ``ep_shard`` splits are
   allowed (the public code raises), since global shapes are explicit.
4. A gate without its up (or the reverse) raises :class:`~lazysd.errors.MissingSourceError`
   naming the key; the public adapter drops it silently.
5. A DTensor ``gate_and_up_projs`` sharded on its last (gate|up) dim, or gate/up DTensors whose
   meshes or placements differ, raise :class:`~lazysd.errors.PlacementError`: splitting or
   concatenating local shards there would mix gate and up rows.
6. ``to_hf`` keeps each key's own prefix (``model.``, ``model.language_model.`` or none); the
   public adapter writes the prefix remembered from the last ``from_hf`` call that saw expert
   keys, so its ``to_hf`` depends on call history. ``from_hf`` never changes adapter state.
7. Keys must match fully (``model.layers.3.moe.gate_proj.weight_scale`` is passed through, not
   taken for an expert weight as the public prefix-only ``re.match`` would).
8. Expert dim 0 is checked against ``moe_config.n_routed_experts`` and gate/up shapes and
   dtypes against each other (:class:`~lazysd.errors.ShapeMismatchError`, naming the keys).
9. The local-shard shape handed to :func:`_create_dtensor_from_local_or_reference` is checked
   against the shard the placements give this rank (:class:`~lazysd.errors.PlacementError`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import torch

from .adapters import known
from .checkpoint import TensorInfo
from .dcp import HFReader
from .distributed import Target, contiguous_stride, local_box_of, mesh_device
from .errors import MissingKeyError, MissingSourceError, PlacementError, ShapeMismatchError
from .export.view import HFEntry, HFView, clip, map_placements
from .export.view import local_box as dtensor_box
from .geometry import Box, full_box
from .lazy import LazyTensor, is_dtensor
from .plan import Entry, Source, resolve
from .reader import MiB, Reader, ReadOptions, to_native
from .reverse import extract
from .rules import Pattern, Rule, claim

__all__ = ["HFCheckpointView", "Step3p5StateDictAdapter", "use_lazysd_reader"]

_ADAPTER = known()["step3p5"]
# Per-layer keys, with the prefixes the public adapter accepts; rules are written for "model.".
_LAYER_KEY = re.compile(r"(?P<prefix>(?:model\.)?(?:language_model\.)?)(?P<rest>layers\.(?:0|[1-9][0-9]*)\..+)")
_LEGACY_ROUTER_BIAS = Pattern("model.layers.{layer}.moe.gate.bias")
_STORED = Rule("{key}")  # the rule of a tensor exposed as stored (HFCheckpointView)
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


# ---- DTensor helpers ---------------------------------------------------------------------
def _swap_shard_placements_1_2(placements: tuple) -> tuple:
    """Swap ``Shard(1)`` and ``Shard(2)`` in DTensor placements, for a ``transpose(1, 2)``.

    After transposing dims 1 and 2 of a 3-D local shard, the mesh dims that sharded dim 1
    now shard dim 2 and the other way round; other placements are unchanged.

    Example:
        >>> from torch.distributed.tensor import Replicate, Shard
        >>> _swap_shard_placements_1_2((Shard(1), Shard(0), Replicate(), Shard(2)))
        (Shard(dim=2), Shard(dim=0), Replicate(), Shard(dim=1))
    """
    from torch.distributed.tensor import Shard

    swap = {1: 2, 2: 1}
    return tuple(Shard(swap[p.dim]) if type(p) is Shard and p.dim in swap else p for p in placements)


def _ep_layout(device_mesh: Any) -> tuple[Any, tuple]:
    """The (sub)mesh and placements of native expert tensors that ``device_mesh`` implies.

    ``ep`` shards experts (``Shard(0)``); when ``ep_shard`` or ``ep_replicate`` has more than
    one rank, ``ep_shard`` shards native dim 1 and ``ep_replicate`` replicates, as Automodel's
    FSDP-over-EP layout does. Other mesh dims are left out (the data is the same across them).
    A 1-D mesh without an ``ep`` name is taken as the EP mesh.
    """
    from torch.distributed.tensor import Replicate, Shard

    names = tuple(device_mesh.mesh_dim_names or ())
    if "ep" not in names:
        if device_mesh.ndim == 1:
            return device_mesh, (Shard(0),)
        raise PlacementError(f"device_mesh {device_mesh} has no 'ep' dim to shard experts over (dims: {names})")
    size = dict(zip(names, device_mesh.shape))
    fsdp = any(size.get(n, 1) > 1 for n in ("ep_shard", "ep_replicate"))
    kinds = {"ep": Shard(0), "ep_shard": Shard(1), "ep_replicate": Replicate()}
    used = tuple(n for n in names if n == "ep" or (fsdp and n in ("ep_shard", "ep_replicate")))
    mesh = device_mesh if used == names else device_mesh[used]
    return mesh, tuple(kinds[n] for n in used)


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
    return _create_dtensor_from_local_or_reference(local, native, placements_override=tuple(placements), global_shape=entry.shape)  # type: ignore[arg-type]


def _rank_box(shape: Sequence[int], mesh: Any, placements: Sequence[Any]) -> Box:
    """The block of a global tensor that this rank holds under ``placements``."""
    return local_box_of(tuple(shape), Target(mesh, tuple(placements)))


def _create_dtensor_from_local_or_reference(
    local_tensor: torch.Tensor,
    reference_dtensor: torch.Tensor | None,
    device_mesh: Any = None,
    rank: int | None = None,
    placements_override: tuple | None = None,
    *,
    n_experts: int | None = None,
    global_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Wrap a rank-local tensor as a DTensor with an explicit global shape and stride.

    Args:
        local_tensor: this rank's block of the (transformed) tensor.
        reference_dtensor: a DTensor whose mesh and placements the result keeps (e.g. the HF
            DTensor the local block was converted from); ignored unless it is a DTensor.
        device_mesh: used when there is no reference: experts ``Shard(0)`` over its ``ep``
            dim (plus ``Shard(1)`` over ``ep_shard`` when that dim has several ranks).
        rank: accepted for compatibility; the device comes from the mesh's ``device_type``.
        placements_override: placements to use instead of the reference's or the mesh's,
            e.g. :func:`_swap_shard_placements_1_2` of the reference's after a transpose.
        n_experts: global size of dim 0, for uneven expert splits without a reference.
        global_shape: the global shape, when the caller knows it (``from_hf`` always does).

    Without ``global_shape``, each sharded dim takes its global size from the reference dim
    that the same mesh dim shards (a transpose moves the shard, not the size), and only where
    there is no reference is the even-split guess ``local * mesh size`` used.

    Returns:
        A DTensor when a reference DTensor or ``device_mesh`` is given, else ``local_tensor``.
        Local storage is shared (a LazyTensor stays lazy inside the DTensor).

    Raises:
        PlacementError: ``local_tensor`` is not the block the placements give this rank.

    Example:
        >>> dt = _create_dtensor_from_local_or_reference(w_local, None, mesh, n_experts=10)  # doctest: +SKIP
        >>> dt.shape[0], dt.placements                                                        # doctest: +SKIP
        (10, (Shard(dim=0),))
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_global_tensor_info

    if reference_dtensor is not None and is_dtensor(reference_dtensor):
        mesh = reference_dtensor.device_mesh
        placements = tuple(placements_override if placements_override is not None else reference_dtensor.placements)
    elif device_mesh is not None:
        if placements_override is not None:
            mesh, placements = device_mesh, tuple(placements_override)
        else:
            mesh, placements = _ep_layout(device_mesh)
    else:
        return local_tensor
    if len(placements) != mesh.ndim:
        raise PlacementError(f"{len(placements)} placements {placements} for a {mesh.ndim}-d mesh {mesh}")

    if global_shape is not None:
        shape = [int(s) for s in global_shape]
    else:
        shape, _ = compute_global_tensor_info(local_tensor, mesh, list(placements))
        shape = list(shape)
        if reference_dtensor is not None and is_dtensor(reference_dtensor):
            for p, q in zip(placements, reference_dtensor.placements):
                if isinstance(p, Shard) and isinstance(q, Shard) and q.dim < reference_dtensor.ndim:
                    shape[p.dim] = reference_dtensor.shape[q.dim]
        if n_experts is not None and shape:
            shape[0] = n_experts
    expected = _rank_box(shape, mesh, placements)
    if tuple(hi - lo for lo, hi in expected) != tuple(local_tensor.shape):
        raise PlacementError(
            f"local shard of shape {list(local_tensor.shape)} is not this rank's block "
            f"{[list(b) for b in expected]} of global shape {shape} under placements {placements} on {mesh}"
        )
    return _wrap(local_tensor, mesh, placements, tuple(shape))


def _wrap(local: torch.Tensor, mesh: Any, placements: tuple, shape: tuple[int, ...]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(local, LazyTensor):
        # from_local would move a tensor on another device with .to(), reading it; a LazyTensor
        # is put on the mesh's device unread. Its view_as() stays lazy, so the DTensor holds it
        # unread and the read waits for the copy into a parameter.
        device = mesh_device(mesh, torch.device("cpu"))
        if local.device != device:
            local = LazyTensor(local.entry, local._reader, local.box, dtype=local.dtype, device=device)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=_global_stride(local, shape))


def _global_stride(local: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A global stride laid out in the local block's memory order.

    A contiguous block gives the contiguous stride; a transposed view of a parameter (a
    write-through ``to_hf`` value, ``down_projs`` from ``from_hf``) gives the same transpose of
    the global tensor, as ``DTensor.from_local`` would infer for an even split.
    """
    if isinstance(local, LazyTensor) or local.is_contiguous():
        return contiguous_stride(shape)
    order = sorted(range(len(shape)), key=lambda d: (-local.stride(d), d))  # outermost first
    stride = [0] * len(shape)
    step = 1
    for d in reversed(order):
        stride[d] = step
        step *= shape[d]
    return tuple(stride)


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
    """Copy the ``box`` of ``entry`` out of in-memory sources into ``dest`` (torch ops).

    Each source is sliced before it is permuted, so with a mesh only this rank's rows are copied.
    """
    for src in entry.sources:
        found = src.source_region(box)
        if found is None:
            continue
        src_box, native = found
        block = to_native(values[src.info.key][tuple(slice(a, b) for a, b in src_box)], src.dims)
        dest[tuple(slice(lo - b[0], hi - b[0]) for (lo, hi), b in zip(native, box))].copy_(block)
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
        # Set by use_lazysd_reader around a Checkpointer load whose reader serves native keys.
        self._native_checkpoint_load = False

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
                only this rank's block (see :func:`_create_dtensor_from_local_or_reference`).
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
            submesh, placements = _ep_layout(mesh)
            box = _rank_box(entry.shape, submesh, placements)
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
        return _create_dtensor_from_local_or_reference(local, None, submesh, placements_override=placements, global_shape=entry.shape)

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
        return _create_dtensor_from_local_or_reference(local, ref, placements_override=tuple(native_placements), global_shape=entry.shape)

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
            if for_checkpoint_load and self._native_checkpoint_load:
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


# ---- a lazy HF-keyed view of a checkpoint ------------------------------------------------
class HFCheckpointView(Mapping[str, torch.Tensor]):
    """A checkpoint directory's tensors under their HF keys, read only when used.

    The input ``from_hf`` turns into lazy native tensors: pass it where Automodel passes the
    HF state dict and nothing is read until parameters are filled, each rank reading only
    its experts. Opening reads config.json and headers only.

    Args:
        path: checkpoint directory (``config.json`` + ``*.safetensors`` [+ index]), or a URL
            (``s3://``, ``https://``, ``hf://`` ...; ``storage_options`` as for
            :class:`~lazysd.VirtualStateDict`).
        threads, chunk_bytes, max_inflight_bytes: read options, as for
            :class:`~lazysd.VirtualStateDict`.

    Example:
        >>> hf = HFCheckpointView("/ckpt/Step-3.5-Flash")                         # doctest: +SKIP
        >>> native = Step3p5StateDictAdapter(cfg, moe_cfg, None).from_hf(hf)      # doctest: +SKIP
        >>> hf.bytes_read                                                         # doctest: +SKIP
        0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        chunk_bytes: int | None = None,
        max_inflight_bytes: int = 32 * MiB,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        from .storage import open_checkpoint

        self.checkpoint = open_checkpoint(path, storage_options=storage_options)
        if not self.checkpoint.local:
            threads = max(threads or 0, 8)  # latency-bound: more requests in flight
        self.reader = Reader(self.checkpoint, ReadOptions(threads, chunk_bytes, max_inflight_bytes))

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self.checkpoint.tensors.get(key)
        if info is None:
            raise MissingKeyError(f"{self.checkpoint.path}: no HF key {key!r} ({len(self)} keys; see .keys())")
        n = len(info.shape)
        entry = Entry(key, info.shape, info.dtype, (Source(info=info, start=(0,) * n, dims=tuple(range(n))),), _STORED)
        return LazyTensor(entry, self.reader, full_box(info.shape), dtype=info.dtype, device=torch.device("cpu"))

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.tensors)

    def __len__(self) -> int:
        return len(self.checkpoint.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.checkpoint.tensors

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from disk so far (headers not counted)."""
        return self.checkpoint.bytes_read

    def close(self) -> None:
        """Release reader threads and file descriptors."""
        self.reader.close()
        self.checkpoint.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFCheckpointView({str(self.checkpoint.path)!r}, {len(self)} tensors, {self.bytes_read} bytes read)"


# ---- NeMo Automodel's Checkpointer -------------------------------------------------------
def use_lazysd_reader(checkpointer: Any, **options: Any) -> Any:
    """Make a NeMo Automodel ``Checkpointer`` read HF safetensors through :class:`lazysd.dcp.HFReader`.

    One line after building the Checkpointer; its loads (``load_base_model``, ``load_model``)
    then read exact byte ranges, each rank only the bytes of its own shards::

        checkpointer = Checkpointer(config, dp_rank, tp_rank, pp_rank, moe_mesh=moe_mesh)
        use_lazysd_reader(checkpointer)
        checkpointer.load_base_model(model, device, root_dir, "/ckpt/Step-3.5-Flash")

    The route is picked per load, from the model's ``state_dict_adapter``:

    * this module's :class:`Step3p5StateDictAdapter` (the one-import swap): the native route.
      Its ``to_hf(..., for_checkpoint_load=True)`` hands the model's state dict over unchanged,
      ``HFReader(path)`` describes the checkpoint under native keys, and DCP's planner reads
      every parameter's local shard straight into it, transposes fused into the reads;
      ``from_hf`` then finds every value loaded in place and returns nothing to copy. In a
      single process too: the adapter is registered as an Automodel ``StateDictAdapter`` whose
      DCP load needs no temporaries (``supports_low_memory_dcp_load``), so the Checkpointer
      takes its DCP route instead of mapping the whole checkpoint first.
    * any other adapter (Automodel's own) or none: ``HFReader(path, native=False)`` replaces
      Automodel's ``_HuggingFaceStorageReader``: the same HF keys, exact ranges instead of
      mmap readahead, validated headers. The adapter's conversions are unchanged.
    * a load with a ``key_mapping`` (checkpoint keys renamed on the fly), or of a directory
      without safetensors files: Automodel's own reader, unchanged.

    Args:
        checkpointer: a ``nemo_automodel.components.checkpoint.checkpointing.Checkpointer``.
        **options: passed to every :class:`~lazysd.dcp.HFReader` (``threads=``,
            ``max_inflight_bytes=``, ``chunk_bytes=``).

    Returns:
        ``checkpointer``, changed in place (calling this twice changes nothing more).
    """
    if getattr(checkpointer, "_lazysd_reader", None) is not None:
        return checkpointer
    from nemo_automodel.components.checkpoint.state_dict_adapter import (
        StateDictAdapter,  # the caller has Automodel
    )

    StateDictAdapter.register(Step3p5StateDictAdapter)
    route: dict[str, bool | None] = {"native": None}  # set for the duration of one load_model call
    load_model, get_reader = checkpointer.load_model, checkpointer._get_storage_reader

    def lazysd_load_model(model: Any, model_path: str, *args: Any, **kwargs: Any) -> Any:
        part = model[0] if isinstance(model, (list, tuple)) else model
        adapter = getattr(getattr(part, "module", part), "state_dict_adapter", None)  # DDP keeps the model in .module
        native = isinstance(adapter, Step3p5StateDictAdapter)
        route["native"] = native
        if native:
            adapter._native_checkpoint_load = True  # type: ignore[union-attr]
        try:
            return load_model(model, model_path, *args, **kwargs)
        finally:
            route["native"] = None
            if native:
                adapter._native_checkpoint_load = False  # type: ignore[union-attr]

    def lazysd_storage_reader(model_path: str, key_mapping: Any, *args: Any, **kwargs: Any) -> Any:
        native = route["native"]
        if native is None or key_mapping is not None or not HFReader.validate_checkpoint_id(model_path):
            return get_reader(model_path, key_mapping, *args, **kwargs)
        return HFReader(model_path, adapter=_ADAPTER, **options) if native else HFReader(model_path, native=False, **options)

    checkpointer.load_model = lazysd_load_model
    checkpointer._get_storage_reader = lazysd_storage_reader
    checkpointer._lazysd_reader = options
    return checkpointer
