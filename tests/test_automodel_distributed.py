"""lazysd.automodel on real DTensors: gloo ranks in separate processes, CPU only.

Each rank checks its own results against the eager, single-process conversion; any failed
assertion in a rank fails the test with that rank's traceback. Ranks come from
``tests.support.dist.run_ranks`` (a fork server that imports torch once).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from lazysd import LazyTensor, PlacementError
from lazysd.automodel import (
    HFCheckpointView,
    Step3p5StateDictAdapter,
    _create_dtensor_from_local_or_reference,
    _swap_shard_placements_1_2,
)
from lazysd.testing import Step3p5Spec, load_hf_tensors, make_checkpoint
from tests.support.dist import run_ranks

L = "model.layers.1"


def _adapter(n_experts: int, inter: int, dtype: torch.dtype = torch.float32) -> Step3p5StateDictAdapter:
    return Step3p5StateDictAdapter(SimpleNamespace(), SimpleNamespace(n_routed_experts=n_experts, moe_inter_dim=inter), None, dtype=dtype)


def _hf(E: int, I: int, D: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)  # the same on every rank
    return {
        f"{L}.moe.gate_proj.weight": torch.randn(E, I, D, generator=g),
        f"{L}.moe.up_proj.weight": torch.randn(E, I, D, generator=g),
        f"{L}.moe.down_proj.weight": torch.randn(E, D, I, generator=g),
    }


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _check_helpers(mesh2d) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    # FSDP-over-EP layout: [Shard(1) on ep_shard, Shard(0) on ep]; uneven on both dims.
    w = torch.arange(5 * 3 * 4, dtype=torch.float32).reshape(5, 3, 4)
    dt = distribute_tensor(w, mesh2d, [Shard(1), Shard(0)])
    local_t = dt.to_local().transpose(1, 2)
    swapped = _swap_shard_placements_1_2(dt.placements)
    assert swapped == (Shard(2), Shard(0))
    out = _create_dtensor_from_local_or_reference(local_t, dt, placements_override=swapped)
    assert out.shape == (5, 4, 3) and out.placements == swapped and out.device_mesh == mesh2d
    assert _equal(out.full_tensor(), w.transpose(1, 2))
    assert out.to_local().data_ptr() == local_t.data_ptr()  # local storage shared
    # Without the swap the shard would be declared on the wrong dim: refused, not mis-shaped.
    with pytest.raises(PlacementError, match="is not this rank's block"):
        _create_dtensor_from_local_or_reference(local_t, dt)

    # No reference: mesh placements, explicit global expert count for an uneven split.
    mine = _create_dtensor_from_local_or_reference(dt.to_local(), None, mesh2d, dist.get_rank(), n_experts=5, global_shape=(5, 3, 4))
    assert mine.placements == (Shard(1), Shard(0)) and _equal(mine.full_tensor(), w)


def _check_from_hf_plain(mesh, E: int, I: int, D: int) -> None:
    from torch.distributed.tensor import DTensor, Shard

    hf = _hf(E, I, D)
    eager = _adapter(E, I).from_hf(hf)
    out = _adapter(E, I).from_hf(hf, device_mesh=mesh)
    assert list(out) == list(eager)
    expected_placements = (Shard(0),) if mesh.ndim == 1 else (Shard(1), Shard(0))
    for key, value in out.items():
        assert isinstance(value, DTensor) and value.placements == expected_placements, key
        assert value.shape == eager[key].shape, key
        assert _equal(value.full_tensor(), eager[key]), key
    # Rank-local: this rank holds exactly its block of experts (and of dim 1 under ep_shard).
    fused = out[f"{L}.moe.experts.gate_and_up_projs"]
    n_local = fused.to_local().shape[0]
    ep_size = mesh.shape[mesh.mesh_dim_names.index("ep")]
    size = -(-E // ep_size)  # DTensor's Shard(0) split: ceil-sized blocks, the last ones short or empty
    assert n_local == max(0, min(size, E - size * mesh.get_local_rank("ep")))


def _check_from_hf_dtensor(mesh2d, E: int, I: int, D: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    hf = _hf(E, I, D)
    eager = _adapter(E, I).from_hf(hf)
    placed = {k: distribute_tensor(v, mesh2d, [Shard(2), Shard(0)]) for k, v in hf.items()}
    out = _adapter(E, I).from_hf(placed, device_mesh=mesh2d)
    for key, value in out.items():
        assert value.placements == (Shard(1), Shard(0)) and value.device_mesh == mesh2d, key
        assert _equal(value.full_tensor(), eager[key]), key
    back = _adapter(E, I).to_hf(out)
    assert list(back) == [f"{L}.moe.gate_proj.weight", f"{L}.moe.up_proj.weight", f"{L}.moe.down_proj.weight"]
    for key, value in back.items():
        assert value.placements == (Shard(2), Shard(0)), key
        assert _equal(value.full_tensor(), hf[key]), key
    # A shard on the HF dim that becomes the gate|up dim cannot be concatenated locally.
    bad = {k: distribute_tensor(v, mesh2d, [Shard(1), Shard(0)]) for k, v in hf.items() if "down" not in k}
    with pytest.raises(PlacementError, match=r"model\.layers\.1\.moe\.gate_proj\.weight is sharded on dim 1, which becomes the gate\|up dim 2"):
        _adapter(E, I).from_hf(bad)


def _check_lazy(mesh, ckpt: str) -> None:
    from torch.distributed.tensor import distribute_tensor

    eager = _adapter(8, 16, torch.bfloat16).from_hf(load_hf_tensors(ckpt))
    with HFCheckpointView(ckpt) as view:
        out = _adapter(8, 16, torch.bfloat16).from_hf(view, device_mesh=mesh)
        key = "model.layers.2.moe.experts.down_projs"
        value = out[key]
        assert isinstance(value._local_tensor, LazyTensor)  # still unread inside the DTensor
        assert view.bytes_read == 0
        param = distribute_tensor(torch.zeros(eager[key].shape, dtype=torch.bfloat16), value.device_mesh, value.placements)
        param.copy_(value)
        local = param.to_local()
        assert view.bytes_read == local.numel() * local.element_size() > 0  # this rank's block, once
        assert _equal(param.full_tensor(), eager[key])


def _check_write_through(mesh, ckpt: str, placements: tuple, reader: str) -> None:
    """A DCP load into to_hf(for_checkpoint_load=True) of DTensor experts fills their local shards in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.tensor import DTensor, distribute_tensor

    from lazysd import VirtualStateDict
    from lazysd.dcp import HFReader

    with VirtualStateDict(ckpt) as vsd:
        want = {k: v.materialize() for k, v in vsd.items()}
    native = {
        k: distribute_tensor(torch.zeros_like(v), mesh, placements) if ".experts." in k else torch.zeros_like(v) for k, v in want.items()
    }
    locals_before = {k: (v.to_local() if isinstance(v, DTensor) else v).data_ptr() for k, v in native.items()}
    a = _adapter(8, 16, torch.bfloat16)
    hf = a.to_hf(native, for_checkpoint_load=True)
    down = hf["model.layers.2.moe.down_proj.weight"]
    assert isinstance(down, DTensor) and down.shape == (8, 32, 16)
    native_down = native["model.layers.2.moe.experts.down_projs"].to_local()
    assert down.to_local().untyped_storage().data_ptr() == native_down.untyped_storage().data_ptr()  # a view, no copy
    storage_reader = HuggingFaceStorageReader(ckpt) if reader == "torch" else HFReader(ckpt, native=False)
    dcp.load(hf, storage_reader=storage_reader)
    assert a.from_hf(hf, device_mesh=mesh) == {} and a.view_loaded_native_keys == set(native)
    for key, value in native.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        assert local.data_ptr() == locals_before[key], key
        full = value.full_tensor() if isinstance(value, DTensor) else value
        assert _equal(full, want[key]), key
    if reader == "lazysd":  # exactly this rank's bytes: its experts, every other tensor whole
        ideal = sum(v.to_local().nbytes if isinstance(v, DTensor) else v.nbytes for v in native.values())
        assert storage_reader.bytes_read == ideal


def _worker(rank: int, world: int, ckpt: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    ep = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    _check_from_hf_plain(ep, E=5, I=3, D=4)  # uneven experts
    _check_lazy(ep, ckpt)
    # to_hf never gathers: a gate|up dim shard does not split into HF shards, for saving or loading.
    from torch.distributed.tensor import Shard, distribute_tensor

    fused = distribute_tensor(torch.zeros(4, 5, 6), ep, [Shard(2)])
    for load in (False, True):
        with pytest.raises(PlacementError, match=r"gate_and_up_projs is placed \(Shard\(dim=2\),\): its local shard does not split"):
            _adapter(4, 3).to_hf({f"{L}.moe.experts.gate_and_up_projs": fused}, for_checkpoint_load=load)
    _check_write_through(ep, ckpt, (Shard(0),), "torch")
    _check_write_through(ep, ckpt, (Shard(0),), "lazysd")
    if world == 4:
        mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep_shard", "ep"))
        _check_helpers(mesh2d)
        _check_from_hf_plain(mesh2d, E=5, I=3, D=5)  # uneven experts and uneven ep_shard
        _check_from_hf_dtensor(mesh2d, E=6, I=3, D=5)
        _check_lazy(mesh2d, ckpt)
        _check_write_through(mesh2d, ckpt, (Shard(1), Shard(0)), "lazysd")  # FSDP-over-EP: dim 1 on ep_shard
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_automodel_adapter_on_gloo_ranks(tmp_path: Path, world: int) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", Step3p5Spec.tiny(), layout="split")
    run_ranks(_worker, world, (str(ckpt),))
