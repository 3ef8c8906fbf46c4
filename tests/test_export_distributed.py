"""Distributed export on CPU with real gloo ranks: every rank writes only the experts it holds.

Each test starts 2 or 4 processes; the output must be byte-identical to a single-process
export of the same (full) state dict. Ranks come from ``tests.support.dist.run_ranks`` (a
fork server that imports torch once: seconds per test, not tens).
"""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lazysd import HFView, VirtualStateDict, save_hf
from lazysd.distributed import contiguous_stride
from lazysd.testing import Step3p5Spec, checkpoint_nbytes, make_checkpoint
from tests.support.dist import run_ranks
from tests.test_export import PER_EXPERT, per_expert_native  # the per-expert test family

SPEC = Step3p5Spec.tiny()  # 8 experts
EXPERT_SUFFIXES = ("moe.experts.gate_and_up_projs", "moe.experts.down_projs", "mlp.experts.gate_and_up_projs", "mlp.experts.down_projs")


def _mesh(world: int, two_d: bool):
    if two_d:  # FSDP-style: native expert dim 1 over ep_shard, experts over ep
        return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep_shard", "ep")), [Shard(1), Shard(0)]
    return init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), [Shard(0)]


def _local(full_or_lazy: torch.Tensor, mesh, placements) -> torch.Tensor:
    """This rank's shard of a native expert tensor: for a LazyTensor only these bytes are read."""
    shape, offset = compute_local_shape_and_global_offset(full_or_lazy.shape, mesh, placements)
    local = full_or_lazy[tuple(slice(o, o + s) for o, s in zip(offset, shape))].contiguous()
    stride = contiguous_stride(tuple(full_or_lazy.shape))
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=full_or_lazy.shape, stride=stride)


def _worker(rank: int, world: int, tmp: str, cases: list[str], two_d: bool) -> None:
    for case in cases:
        _run_case(rank, world, tmp, case, two_d)
        dist.barrier()


def _run_case(rank: int, world: int, tmp: str, case: str, two_d: bool) -> None:
    mesh, placements = _mesh(world, two_d)
    out = Path(tmp) / f"dist-{case}"
    if case in ("fail-write", "meta"):
        _failing_case(rank, Path(tmp), case, mesh, placements)
        return
    if case == "per-expert":
        sd = {k: _local(v, mesh, placements) if k.endswith(EXPERT_SUFFIXES) else v for k, v in per_expert_native(E=5).items()}
        save_hf(sd, out, adapter=PER_EXPERT, max_shard_size=200)
        return
    with VirtualStateDict(Path(tmp) / "src", include_mtp=True) as vsd:
        sd = {k: _local(vsd[k], mesh, placements) if k.endswith(EXPERT_SUFFIXES) else vsd[k] for k in vsd}
        save_hf(sd, out, adapter="step3p5", num_layers=SPEC.num_hidden_layers, max_shard_size="40KB")
        (Path(tmp) / f"read-{case}-{rank}.json").write_text(json.dumps(vsd.bytes_read))

        # The mapping keeps placements where they carry over, from local shards only.
        view = HFView(sd, adapter="step3p5", num_layers=SPEC.num_hidden_layers)
        gate, down = view["model.layers.1.moe.gate_proj.weight"], view["model.layers.1.moe.down_proj.weight"]
        full_gau = sd["model.layers.1.moe.experts.gate_and_up_projs"]
        I = SPEC.moe_intermediate_size
        if two_d:
            assert list(gate.placements) == [Shard(2), Shard(0)]  # native Shard(1) of [E, D, 2I] is HF dim 2
            assert list(down.placements) == [Shard(2), Shard(0)]  # native Shard(1) of [E, I, D] is HF dim 2 of [E, D, I]
        else:
            assert list(gate.placements) == [Shard(0)]
        assert tuple(gate.shape) == (SPEC.moe_num_experts, I, SPEC.hidden_size)
        assert torch.equal(gate.to_local(), full_gau.to_local()[:, :, :I].transpose(1, 2))


def _failing_case(rank: int, tmp: Path, case: str, mesh, placements) -> None:
    """One rank fails (a full disk while writing, or a meta tensor): every rank must raise,
    and nothing may be left in place or staged."""
    import errno

    from lazysd.errors import ExportError
    from lazysd.export import Stage

    sd = {k: _local(v, mesh, placements) if k.endswith(EXPERT_SUFFIXES) else v for k, v in per_expert_native(E=5).items()}
    write = Stage.write
    if case == "meta" and rank == 1:
        sd["model.layers.0.mlp.gate.weight"] = torch.empty(5, 6, device="meta")
    if case == "fail-write" and rank == 1:

        def full(self, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        Stage.write = full
    try:
        save_hf(sd, tmp / f"dist-{case}", adapter=PER_EXPERT, max_shard_size=200)
        outcome = "exported"
    except ExportError as e:
        outcome = str(e)
    except OSError as e:
        outcome = f"OSError: {e}"
    finally:
        Stage.write = write
    (tmp / f"{case}-{rank}.txt").write_text(outcome)


def _start(tmp: Path, world: int, cases: list[str], two_d: bool = False) -> None:
    run_ranks(_worker, world, (str(tmp), cases, two_d))


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    make_checkpoint(tmp / "src", SPEC, layout="split")
    with VirtualStateDict(tmp / "src", include_mtp=True) as vsd:
        save_hf(vsd, tmp / "single", max_shard_size="40KB")
    save_hf(per_expert_native(E=5), tmp / "single-per-expert", adapter=PER_EXPERT, max_shard_size=200)
    _start(tmp, 2, ["ep2", "per-expert", "fail-write", "meta"])  # one pair of ranks for the 2-rank cases
    return tmp


def test_two_ep_ranks_write_byte_identical_output(tmp: Path) -> None:
    assert_same_files(tmp / "dist-ep2", tmp / "single")
    # Every byte was read by exactly one rank: nobody read (or held) another rank's experts.
    reads = [json.loads((tmp / f"read-ep2-{r}.json").read_text()) for r in range(2)]
    assert sum(reads) == checkpoint_nbytes(SPEC)


def test_four_ranks_ep_by_fsdp_shards_write_byte_identical_output(tmp: Path) -> None:
    _start(tmp, 4, ["ep2x2"], two_d=True)
    assert_same_files(tmp / "dist-ep2x2", tmp / "single")
    reads = [json.loads((tmp / f"read-ep2x2-{r}.json").read_text()) for r in range(4)]
    assert sum(reads) == checkpoint_nbytes(SPEC)


def test_per_expert_family_ranks_write_their_own_keys(tmp: Path) -> None:
    # 5 experts over 2 ranks: 3 + 2, each expert's keys written by the rank holding it.
    assert_same_files(tmp / "dist-per-expert", tmp / "single-per-expert")
    assert len(list((tmp / "single-per-expert").glob("model-*.safetensors"))) > 1


def test_a_rank_failing_to_write_aborts_every_rank_and_stages_nothing(tmp: Path) -> None:
    assert (tmp / "fail-write-1.txt").read_text() == "OSError: [Errno 28] No space left on device"
    assert (tmp / "fail-write-0.txt").read_text().endswith("another rank failed to write its part of the export; nothing was committed")
    assert not (tmp / "dist-fail-write").exists()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".")]


def test_a_meta_tensor_on_one_rank_is_reported_by_every_rank(tmp: Path) -> None:
    for rank in range(2):
        assert "native key 'model.layers.0.mlp.gate.weight' is on the meta device" in (tmp / f"meta-{rank}.txt").read_text()
    assert not (tmp / "dist-meta").exists()
