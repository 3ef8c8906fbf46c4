"""The rules run backwards: which HF tensors a native tensor holds, and where.

For a native key and shape, :func:`hf_pieces` returns one :class:`HFPiece` per HF tensor
inside it (gate and up halves of ``gate_and_up_projs``, one piece per expert in per-expert
families), each with the block of native coordinates it occupies. :func:`extract` cuts a
piece out of a native tensor (or a local shard of one) and turns it back into HF layout.
Nothing is converted until asked for, so export and HF-keyed views stay lazy.

Example:
    >>> from lazysd.adapters import known
    >>> pieces = hf_pieces(known()["step3p5"], "model.layers.3.moe.experts.gate_and_up_projs", (4, 8, 6))
    >>> [(p.key, p.shape) for p in pieces]
    [('model.layers.3.moe.gate_proj.weight', (4, 3, 8)), ('model.layers.3.moe.up_proj.weight', (4, 3, 8))]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShapeMismatchError, UnclaimedKeyError
from .geometry import Block
from .rules import Adapter, Rule


@dataclass(frozen=True)
class HFPiece(Block):
    """One HF tensor inside a native tensor: a :class:`~lazysd.geometry.Block` (``shape`` is
    the HF shape) with its HF key and the rule that places it.

    Built with keywords: ``HFPiece(start=..., dims=..., shape=..., key=..., rule=...)``.
    """

    key: str  # HF key
    rule: Rule


def hf_pieces(adapter: Adapter, key: str, shape: tuple[int, ...], *, num_layers: int | None = None) -> list[HFPiece]:
    """The HF tensors that native ``key`` of ``shape`` holds, in HF key order.

    Parts concatenated on ``cat_dim`` are assumed equal-sized (gate and up always are).

    Raises:
        UnclaimedKeyError: no rule of ``adapter`` produces ``key``.
        ShapeMismatchError: ``shape`` cannot be split as the rule says.
    """
    found = adapter.native_rule(key, num_layers=num_layers)
    if found is None:
        raise UnclaimedKeyError(f"native key {key!r} matches no rule of the {adapter.name} adapter")
    rule, values = found
    parts = rule.sources
    shape = tuple(shape)
    if len(parts) > 1 and shape[rule.cat_dim] % len(parts):
        raise ShapeMismatchError(f"{key}: dim {rule.cat_dim} of shape {list(shape)} does not split into {len(parts)} equal parts")
    step = shape[rule.cat_dim] // len(parts) if len(parts) > 1 else None
    pieces: list[HFPiece] = []
    for pi, part in enumerate(parts):
        dims = part.dims if part.dims is not None else tuple(range(len(shape)))
        if len(dims) != len(shape):
            raise ShapeMismatchError(f"{key}: shape {list(shape)} has {len(shape)} dims, the {rule.native!r} rule expects {len(dims)}")
        extent = list(shape)
        start = [0] * len(shape)
        if step is not None:
            extent[rule.cat_dim] = step
            start[rule.cat_dim] = pi * step
        hf_ndim = sum(d is not None for d in dims)
        hf_shape = [0] * hf_ndim
        for i, d in enumerate(dims):
            if d is not None:
                hf_shape[d] = extent[i]
        if part.per_expert:
            stack = dims.index(None)
            for e in range(shape[stack]):
                s = list(start)
                s[stack] = e
                pieces.append(HFPiece(start=tuple(s), dims=dims, shape=tuple(hf_shape), key=part.pattern.format(**values, expert=e), rule=rule))
        else:
            pieces.append(HFPiece(start=tuple(start), dims=dims, shape=tuple(hf_shape), key=part.pattern.format(**values), rule=rule))
    return pieces


def extract(native: torch.Tensor, piece: HFPiece, *, origin: tuple[int, ...] | None = None) -> torch.Tensor:
    """Piece ``piece`` of ``native`` in HF layout (a view where possible, not a copy).

    Args:
        native: the native tensor, or a local shard of it whose first element sits at
            native coordinates ``origin``; the shard must contain the piece's block.
    """
    origin = origin or (0,) * native.dim()
    index = tuple(slice(s - o, s - o + e) for s, e, o in zip(piece.start, piece.extent, origin))
    block = native[index]
    for i in reversed(range(len(piece.dims))):
        if piece.dims[i] is None:
            block = block.squeeze(i)
    order = [d for d in piece.dims if d is not None]  # block dim j holds HF dim order[j]
    inverse = [order.index(d) for d in range(len(order))]
    return block.permute(inverse)
