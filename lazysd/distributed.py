"""Meshes and placements: which box of each native tensor this rank holds, as DTensors.

Two ways to say what a rank owns:

* ``VirtualStateDict(path, mesh)``: routed-expert tensors (rules of kind ``"experts"``)
  become DTensors sharded ``Shard(0)`` over the mesh's expert-parallel dimension ("ep", the
  only dimension of a 1-D mesh, or ``ep_dim=``) and replicated over the others, so rank ``r``
  holds experts ``[r * n_local, (r + 1) * n_local)``. Everything else is whole on every rank:
  plain LazyTensors, or ``Replicate`` DTensors with ``replicate=True``.
* ``VirtualStateDict(path, like=model)``: every value mirrors the mesh and placements of the
  model's own parameter of the same key (any mix of ``Shard(d)`` and ``Replicate`` on 1-D and
  2-D meshes); plain parameters get whole tensors.

The local box of each DTensor follows DTensor's own chunking (uneven shards included), and
its local tensor is a LazyTensor of exactly that box, so each rank reads only the HF rows and
columns its shard needs, mapped through the transposes by the plan. Values are built with
``DTensor.from_local(..., shape=, stride=)`` so global shapes are always right.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import PlacementError
from .geometry import Box, contiguous_stride, full_box, shard_box
from .plan import Entry

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Target:
    """Where one native tensor goes: a mesh and placements (one per mesh dim)."""

    mesh: DeviceMesh
    placements: tuple[Any, ...]


def mesh_device(mesh: DeviceMesh, fallback: torch.device) -> torch.device:
    """The device this rank's shards live on: the mesh's accelerator, else ``fallback``."""
    if mesh.device_type == "cpu":
        return fallback
    return torch.device(mesh.device_type, torch.accelerator.current_device_index())


def local_box_of(shape: tuple[int, ...], target: Target) -> Box:
    """This rank's box of a tensor of ``shape`` under ``target``, by DTensor's Shard rule.

    ``Shard``/``Replicate`` placements go through :func:`lazysd.geometry.shard_box`; other
    placement types (e.g. ``_StridedShard``) through DTensor's own function.
    """
    if all(type(p).__name__ in ("Shard", "Replicate") for p in target.placements):
        coordinate = target.mesh.get_coordinate()
        if coordinate is not None:
            return shard_box(shape, tuple(target.mesh.shape), coordinate, target.placements)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(shape, target.mesh, list(target.placements))
    return tuple((o, o + n) for o, n in zip(offset, local_shape))


def ep_dim_index(mesh: DeviceMesh, ep_dim: str | int | None) -> int:
    """Index of the expert-parallel dimension of ``mesh``."""
    names = tuple(mesh.mesh_dim_names or ())
    if isinstance(ep_dim, int):
        if not 0 <= ep_dim < mesh.ndim:
            raise PlacementError(f"ep_dim={ep_dim} but the mesh has {mesh.ndim} dimension(s) {names or ''}")
        return ep_dim
    if isinstance(ep_dim, str):
        if ep_dim not in names:
            raise PlacementError(f"ep_dim={ep_dim!r} is not a dimension of the mesh (dimensions: {names or 'unnamed'})")
        return names.index(ep_dim)
    if "ep" in names:
        return names.index("ep")
    if mesh.ndim == 1:
        return 0
    raise PlacementError(
        f"the mesh has {mesh.ndim} dimensions {names or '(unnamed)'} and none is named 'ep'; "
        "pass ep_dim= (a name or an index) to say which one splits the experts"
    )


def _check_mesh(mesh: DeviceMesh) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise PlacementError("a mesh needs an initialized default process group (torch.distributed.init_process_group)")
    world = dist.get_world_size()
    ranks = mesh.mesh.flatten().tolist()
    if max(ranks) >= world:
        raise PlacementError(f"the mesh names ranks {ranks} but the process group has only {world} ranks")
    if mesh.get_coordinate() is None:
        raise PlacementError(
            f"rank {dist.get_rank()} is not part of the mesh (ranks {ranks}); every loading rank must be"
        )


def _dtensor_target(value: Any) -> Target | None:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return Target(value.device_mesh, tuple(value.placements))
    return None


class Targets:
    """Per-key targets of one state dict (see the module docstring).

    Built from the plan's entries alone; :meth:`place` answers, for one entry, this rank's
    box and the target to wrap it in. Building values is the caller's job, so this module
    never calls back into :class:`~lazysd.VirtualStateDict`.
    """

    def __init__(self, targets: dict[str, Target], default: Target | None, replicate_rest: Target | None) -> None:
        self.targets = targets
        self.default = default  # for expert tensors, when built from a mesh
        self.replicate_rest = replicate_rest  # for everything else, when replicate=True

    @classmethod
    def build(
        cls,
        entries: Mapping[str, Entry],
        where: str,
        *,
        mesh: Any,
        like: Any,
        ep_dim: str | int | None,
        replicate: bool,
    ) -> Targets:
        """Targets from a mesh (experts ``Shard(0)`` over its EP dim) and/or ``like=``.

        ``where`` names the checkpoint in error messages.
        """
        from torch.distributed.tensor import Replicate, Shard

        targets: dict[str, Target] = {}
        default = rest = None
        if mesh is not None:
            _check_mesh(mesh)
            ep = ep_dim_index(mesh, ep_dim)
            default = Target(mesh, tuple(Shard(0) if i == ep else Replicate() for i in range(mesh.ndim)))
            if replicate:
                rest = Target(mesh, tuple(Replicate() for _ in range(mesh.ndim)))
        if like is not None:
            state = like.state_dict() if isinstance(like, torch.nn.Module) else like
            if not isinstance(state, Mapping):
                raise PlacementError(f"like= takes a module or a state dict, got {type(like).__name__}")
            mismatched = []
            checked = [mesh] if mesh is not None else []  # each distinct mesh is checked once
            for key, value in state.items():
                entry = entries.get(key)
                if entry is None:
                    continue
                if tuple(value.shape) != entry.shape:
                    mismatched.append(f"  {key}: model {list(value.shape)}, checkpoint {list(entry.shape)}")
                target = _dtensor_target(value)
                if target is not None:
                    if not any(m is target.mesh for m in checked):
                        _check_mesh(target.mesh)
                        checked.append(target.mesh)
                    targets[key] = target
            if mismatched:
                raise PlacementError(
                    f"{where}: like= model parameters disagree with the checkpoint's native shapes:\n"
                    + "\n".join(mismatched)
                )
        return cls(targets, default, rest)

    def target(self, entry: Entry) -> Target | None:
        """Where ``entry`` goes; None for a plain (whole, unwrapped) tensor."""
        if entry.key in self.targets:
            return self.targets[entry.key]
        if self.default is not None and entry.kind == "experts":
            return self.default
        return self.replicate_rest

    def place(self, entry: Entry) -> tuple[Box, Target | None]:
        """This rank's box of ``entry`` (the whole tensor where it is not sharded) and its target."""
        target = self.target(entry)
        return (full_box(entry.shape) if target is None else local_box_of(entry.shape, target)), target


def as_dtensor(local: torch.Tensor, target: Target, shape: tuple[int, ...]) -> torch.Tensor:
    """``local`` (this rank's box) as a DTensor of global ``shape`` under ``target``.

    The global shape and stride are given, never inferred, so uneven shards are right.
    """
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, target.mesh, target.placements, run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape)
    )
