"""DTensor helpers of the Automodel adapter: Automodel's helper signatures, explicit global shapes.

The public Step3p5 adapter of NeMo Automodel names two of these ``_create_dtensor_from_local_or_reference``
and ``_swap_shard_placements_1_2``; :mod:`lazysd.automodel` keeps those names as aliases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..distributed import Target, contiguous_stride, local_box_of, mesh_device
from ..errors import PlacementError
from ..geometry import Box
from ..lazy import LazyTensor, is_dtensor

__all__ = ["create_dtensor_from_local_or_reference", "ep_layout", "rank_box", "swap_shard_placements_1_2", "wrap_local"]


def swap_shard_placements_1_2(placements: tuple) -> tuple:
    """Swap ``Shard(1)`` and ``Shard(2)`` in DTensor placements, for a ``transpose(1, 2)``.

    After transposing dims 1 and 2 of a 3-D local shard, the mesh dims that sharded dim 1
    now shard dim 2 and the other way round; other placements are unchanged.

    Example:
        >>> from torch.distributed.tensor import Replicate, Shard
        >>> swap_shard_placements_1_2((Shard(1), Shard(0), Replicate(), Shard(2)))
        (Shard(dim=2), Shard(dim=0), Replicate(), Shard(dim=1))
    """
    from torch.distributed.tensor import Shard

    swap = {1: 2, 2: 1}
    return tuple(Shard(swap[p.dim]) if type(p) is Shard and p.dim in swap else p for p in placements)


def ep_layout(device_mesh: Any) -> tuple[Any, tuple]:
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



def rank_box(shape: Sequence[int], mesh: Any, placements: Sequence[Any]) -> Box:
    """The block of a global tensor that this rank holds under ``placements``."""
    return local_box_of(tuple(shape), Target(mesh, tuple(placements)))


def create_dtensor_from_local_or_reference(
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
            e.g. :func:`swap_shard_placements_1_2` of the reference's after a transpose.
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
        >>> dt = create_dtensor_from_local_or_reference(w_local, None, mesh, n_experts=10)  # doctest: +SKIP
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
            mesh, placements = ep_layout(device_mesh)
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
    expected = rank_box(shape, mesh, placements)
    if tuple(hi - lo for lo, hi in expected) != tuple(local_tensor.shape):
        raise PlacementError(
            f"local shard of shape {list(local_tensor.shape)} is not this rank's block "
            f"{[list(b) for b in expected]} of global shape {shape} under placements {placements} on {mesh}"
        )
    return wrap_local(local_tensor, mesh, placements, tuple(shape))


def wrap_local(local: torch.Tensor, mesh: Any, placements: tuple, shape: tuple[int, ...]) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(local, LazyTensor):
        # from_local would move a tensor on another device with .to(), reading it; a LazyTensor
        # is put on the mesh's device unread. Its view_as() stays lazy, so the DTensor holds it
        # unread and the read waits for the copy into a parameter.
        device = mesh_device(mesh, torch.device("cpu"))
        if local.device != device:
            local = LazyTensor(local.entry, local._reader, local.box, dtype=local.dtype, device=device)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=global_stride(local, shape))


def global_stride(local: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
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

