"""HF keys over a native state dict: :class:`HFView`, the one mapping export writes from.

Keys and shapes come from native keys and shapes only, by running the adapter's rules
backwards (:mod:`lazysd.reverse`); each value is cut out and converted when accessed. The
same view with :data:`NATIVE` (every key is its own output key) writes native checkpoints,
and a directory of native safetensors opened as ``VirtualStateDict(path, adapter=NATIVE)``
is read back through it: one view, whatever the source.

Shape legend: E experts, D hidden, I expert intermediate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..adapters import resolve_adapter
from ..distributed import Target, contiguous_stride, local_box_of
from ..errors import ExportError, MissingKeyError, UnclaimedKeyError
from ..geometry import Box, box_shape, source_placements
from ..reverse import HFPiece, extract, hf_pieces
from ..rules import Adapter, Rule
from ..transpose import contiguous

__all__ = ["NATIVE", "HFEntry", "HFView", "clip", "converted", "is_dtensor", "map_placements"]

#: The identity family: every key (dots and all) is its own output key, tensors unchanged.
#: Its layer patterns match no key, so nothing is taken for an MTP layer.
NATIVE = Adapter("native", (), rules=(Rule("{key:**}"),), layer_prefix="\0{layer}.", mtp_prefix="\0mtp.{index}.")

#: Native keys of FP8 block scales kept by ``VirtualStateDict(..., fp8="keep")``.
SCALE_SUFFIX = "_scale_inv"

_FP8 = frozenset(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (checked by name: torch.distributed may be unavailable)."""
    return type(t).__name__ == "DTensor"


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a float8 storage type (raw quantized values, never cast)."""
    return dtype in _FP8


@dataclass(frozen=True)
class HFEntry:
    """One output tensor: where it lives in the native state dict, and what is written."""

    key: str  # output (HF) key
    native_key: str  # native key holding it
    piece: HFPiece  # its block of the native tensor and the dim mapping
    dtype: torch.dtype  # dtype written (rule-pinned dtypes like the fp32 router bias win)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.piece.shape

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def _out_dtype(t: torch.Tensor, rule: Rule, dtype: torch.dtype | None) -> torch.dtype:
    if rule.dtype is not None:
        return rule.dtype
    # FP8 values are raw quantized numbers: casting them would drop their scales.
    if dtype is not None and t.is_floating_point() and not is_fp8(t.dtype):
        return dtype
    return t.dtype


def _pieces(adapter: Adapter, key: str, shape: tuple[int, ...], num_layers: int | None) -> list[HFPiece]:
    """:func:`~lazysd.reverse.hf_pieces`, plus FP8 scales kept as ``<native>_scale_inv``.

    A kept scale tensor is laid out like its weight, one element per scale block, so its
    pieces are the weight's pieces over the scale's shape, with the companion suffix.
    """
    suffix = adapter.scale_suffix
    if suffix and key.endswith(SCALE_SUFFIX) and adapter.native_rule(key, num_layers=num_layers) is None:
        base = key.removesuffix(SCALE_SUFFIX)
        if adapter.native_rule(base, num_layers=num_layers) is not None:
            pieces = hf_pieces(adapter, base, shape, num_layers=num_layers)
            return [replace(p, key=p.key + suffix, rule=replace(p.rule, dtype=torch.float32)) for p in pieces]
    return hf_pieces(adapter, key, shape, num_layers=num_layers)


class HFView(Mapping[str, torch.Tensor]):
    """HF keys over a native state dict; each value is converted only when accessed.

    Keys, ``len`` and shapes (:attr:`entries`) come from native keys and shapes, never from
    tensor data. ``view[key]`` cuts the HF tensor out of its native tensor (gate or up half of
    ``gate_and_up_projs``, transposed back; ``e_score_correction_bias`` as ``router_bias``; one
    expert of a stacked family) and returns it contiguous. Lazy values (a
    :class:`~lazysd.VirtualStateDict`'s) read only that piece's bytes. FP8 weights and their
    ``<native>_scale_inv`` scales (``VirtualStateDict(..., fp8="keep")``) map back to the FP8
    weights and ``weight_scale_inv`` companions as stored, bit for bit.

    DTensor values: when the native placements carry over to the HF tensor, the value is a
    DTensor over the same mesh, built from this rank's local shard without communication:
    ``Shard(0)`` on experts stays ``Shard(0)`` of HF ``[E, I, D]``; ``Shard(1)`` of native
    ``gate_and_up_projs`` ``[E, D, 2I]`` becomes ``Shard(2)``; ``Shard(2)`` of ``down_projs``
    ``[E, I, D]`` becomes ``Shard(1)``. When they do not (a shard of the gate/up concat dim, one
    expert of a per-expert family whose experts are sharded, ``Partial``), the value is the full
    HF tensor from ``full_tensor()``: a collective, so every rank must access such keys in the
    same order. :func:`~lazysd.save_hf` never does this: it writes each rank's local bytes.

    Args:
        state_dict: native key -> tensor (plain, LazyTensor or DTensor), e.g. a model's
            ``state_dict()`` or a VirtualStateDict; a ``torch.nn.Module`` is taken as its
            ``state_dict()``.
        adapter: model family (an Adapter or a registered name); defaults to a
            VirtualStateDict's own adapter. :data:`NATIVE` keeps keys as they are.
        num_layers: main decoder layers, to number ``mtp.layers.{i}`` keys back to
            ``model.layers.{num_layers + i}``; defaults to a VirtualStateDict's config.
        dtype: cast floating-point tensors to this dtype (rule-pinned dtypes, like the fp32
            router bias, and FP8 weights keep theirs).

    Raises:
        UnclaimedKeyError: a native key no rule of the adapter produces.
        ExportError: two native keys give the same HF key, or MTP keys without ``num_layers``.

    Example:
        >>> from lazysd.testing import Step3p5Model, Step3p5Spec
        >>> sd = Step3p5Model(Step3p5Spec.tiny(), layout="native").state_dict()
        >>> view = HFView(sd, adapter="step3p5")
        >>> view["model.layers.1.moe.gate_proj.weight"].shape      # [E, I, D], cut out of gate_and_up_projs
        torch.Size([8, 16, 32])
        >>> view["model.layers.1.moe.router_bias"].dtype
        torch.float32
        >>> len(view) - len(sd)   # 3 MoE layers: gate_and_up_projs splits into gate and up
        3
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
        *,
        adapter: Adapter | str | None = None,
        num_layers: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(state_dict, torch.nn.Module):
            state_dict = state_dict.state_dict()
        self.native = state_dict
        plan = getattr(state_dict, "plan", None)  # a VirtualStateDict knows its family and layers
        if adapter is None:
            adapter = getattr(state_dict, "adapter", None)
            if adapter is None:
                raise ExportError("HFView/save_hf: pass adapter= (e.g. adapter='step3p5') to say how native keys map to HF keys")
        self.adapter = adapter if adapter is NATIVE else resolve_adapter(adapter, {})
        if num_layers is None and plan is not None and self.adapter is not NATIVE:
            num_layers = plan.num_layers
        self.num_layers = num_layers
        self.entries: dict[str, HFEntry] = {}
        for native_key in state_dict:
            t = state_dict[native_key]
            if num_layers is None and self.mtp_index(native_key) is not None:
                raise ExportError(
                    f"native key {native_key!r} is an MTP layer; pass num_layers= (the config's "
                    f"{self.adapter.num_layers[0]}) so it can be numbered back to model.layers.*"
                )
            try:
                pieces = _pieces(self.adapter, native_key, tuple(t.shape), num_layers)
            except UnclaimedKeyError as e:
                if self.adapter.scale_suffix and native_key.endswith(SCALE_SUFFIX):
                    raise UnclaimedKeyError(f"{e}; nor is it the FP8 scale of a key that one produces") from None
                raise
            for piece in pieces:
                if piece.key in self.entries:
                    raise ExportError(
                        f"HF key {piece.key!r} comes from both native key {self.entries[piece.key].native_key!r} and {native_key!r}"
                    )
                self.entries[piece.key] = HFEntry(piece.key, native_key, piece, _out_dtype(t, piece.rule, dtype))

    def mtp_index(self, native_key: str) -> int | None:
        """The MTP layer a native key belongs to (``mtp.layers.{i}.*`` -> i), else None."""
        found = self.adapter.mtp_index(native_key)
        return None if found is None else found[0]

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            raise MissingKeyError(f"no HF key {key[:200]!r} in this view ({len(self)} keys from {len(self.native)} native keys)")
        native = self.native[entry.native_key]
        if is_dtensor(native):
            return _dtensor_value(native, entry)
        return converted(extract(native, entry.piece), entry.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    @property
    def nbytes(self) -> int:
        """Bytes of all HF tensors, as written."""
        return sum(e.nbytes for e in self.entries.values())

    def __repr__(self) -> str:
        return f"HFView({self.adapter.name}, {len(self)} HF keys over {len(self.native)} native keys, {self.nbytes / 2**30:.2f} GiB)"


def converted(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``block`` contiguous and in ``dtype`` (on its own device)."""
    # lazysd's transpose kernel works on CPU memory; other devices copy with their own kernels.
    block = contiguous(block) if block.device.type == "cpu" else block.contiguous()
    return block if block.dtype == dtype else block.to(dtype)


def clip(piece: HFPiece, box: Box) -> tuple[HFPiece, tuple[int, ...]]:
    """The part of ``piece`` inside native ``box``, and where that part starts in the HF tensor.

    The result is empty (a 0 in its shape) when the box misses the piece.
    """
    region = piece.source_region(box)
    if region is None:
        return replace(piece, shape=(0,) * len(piece.shape)), (0,) * len(piece.shape)
    hf, native = region
    return replace(piece, shape=box_shape(hf), start=tuple(lo for lo, _ in native)), tuple(lo for lo, _ in hf)


def local_box(t: Any) -> tuple[Box, tuple[int, ...]]:
    """A DTensor's local shard as a native box, and its origin."""
    box = local_box_of(tuple(t.shape), Target(t.device_mesh, tuple(t.placements)))
    return box, tuple(lo for lo, _ in box)


def map_placements(piece: HFPiece, native_shape: tuple[int, ...], placements: Any) -> list[Any] | None:
    """Native placements as placements of the HF piece, or None where they do not carry over
    (:func:`~lazysd.geometry.source_placements`)."""
    from torch.distributed.tensor import Replicate, Shard

    dims = source_placements(piece, native_shape, placements)
    return None if dims is None else [Replicate() if d is None else Shard(d) for d in dims]


def _dtensor_value(native: Any, entry: HFEntry) -> Any:
    from torch.distributed.tensor import DTensor

    placements = map_placements(entry.piece, tuple(native.shape), native.placements)
    if placements is None:
        return converted(extract(native.full_tensor(), entry.piece), entry.dtype)
    box, origin = local_box(native)
    sub, _ = clip(entry.piece, box)
    local = converted(extract(native.to_local(), sub, origin=origin), entry.dtype)
    return DTensor.from_local(
        local, native.device_mesh, placements, run_check=False, shape=torch.Size(entry.shape), stride=contiguous_stride(entry.shape)
    )
