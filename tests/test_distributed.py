"""Expert parallelism and sharded parameters on real gloo ranks (CPU processes, no mocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lazysd.testing import Step3p5Spec, make_checkpoint
from tests.support.dist import run_ranks, shard_parameters

# Experts of several 4 KiB pages each, so a rank's share is page-aligned-ish and measurable.
SPEC = Step3p5Spec.tiny(
    hidden_size=128, moe_intermediate_size=64, moe_num_experts=8, share_expert_dim=32, intermediate_size=64
)
UNEVEN = Step3p5Spec.tiny(
    hidden_size=128, moe_intermediate_size=64, moe_num_experts=6, share_expert_dim=32, intermediate_size=64
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    return {
        "even": make_checkpoint(root / "even", SPEC, layout="split", seed=5),
        "uneven": make_checkpoint(root / "uneven", UNEVEN, layout="sharded", seed=6),
    }


def _eager(path: str) -> dict[str, torch.Tensor]:
    from lazysd import VirtualStateDict

    with VirtualStateDict(path, threads=0) as vsd:
        return {k: v.materialize() for k, v in vsd.items()}


def _native_model(spec: Step3p5Spec) -> torch.nn.Module:
    from lazysd.testing import Step3p5Model

    return Step3p5Model(spec, layout="native", dtype=torch.bfloat16)



def _ideal_pages(ranges: list[tuple[str, int, int]]) -> dict[str, set[int]]:
    """The pages each file's planned ranges touch, the header page aside."""
    from tests.support.pagecache import page_set

    by_file: dict[str, list[tuple[int, int]]] = {}
    for f, off, n in ranges:
        by_file.setdefault(f, []).append((off, n))
    return {f: page_set(r) - {0} for f, r in by_file.items()}


def _load_alone(rank: int, world: int, files: list[Path], load) -> tuple[dict[str, set[int]], int]:  # noqa: ANN001
    """Ranks take turns: empty page cache, this rank's load; the data pages it left cached
    per file, and the bytes it had read from storage (direct reads leave no page cached)."""
    import torch.distributed as dist

    from tests.support.pagecache import evict, resident_map, storage_bytes

    resident: dict[str, set[int]] = {}
    storage = 0
    for turn in range(world):
        dist.barrier()
        if turn == rank:
            for f in files:
                evict(f)
            before = storage_bytes()
            load()
            storage = storage_bytes() - before
            resident = {str(f): {p for p, cached in enumerate(resident_map(f)) if cached and p} for f in files}
    dist.barrier()
    return resident, storage


def _assert_read_only_planned_pages(r: dict, *where: object) -> None:
    """Measured independently of lazysd's counters: no page outside the plan was cached, and
    the bytes read from storage are the plan's pages (within 1%, + a page per file)."""
    ideal = r["ideal_pages"]
    for f, pages in r["resident"].items():
        assert pages <= ideal.get(f, set()), (*where, f, sorted(pages - ideal.get(f, set())))
    want = 4096 * sum(len(p) for p in ideal.values())
    assert abs(r["storage"] - want) <= 0.01 * want + 4096 * len(ideal), (*where, r["storage"], want)


def _check_ep_one(rank: int, world: int, path: str, spec_name: str, assign: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model

    spec = {"even": SPEC, "uneven": UNEVEN}[spec_name]
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    eager = _eager(path)
    vsd = VirtualStateDict(path, mesh, share=None)  # each rank reads its whole plan (no node sharing)
    if assign:
        model = Step3p5Model(spec, layout="native", device="meta")
        resident, storage = _load_alone(
            rank, world, vsd.checkpoint.files, lambda: model.load_state_dict(vsd, assign=True)
        )
        # Expert-parallel forward (each rank runs its own experts) == single-process forward.
        reference = Step3p5Model(spec, layout="native", device="meta")
        reference.load_state_dict(VirtualStateDict(path), assign=True)
        tokens = torch.arange(10)[None] % spec.vocab_size
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), reference(tokens), rtol=2e-2, atol=2e-2)
    else:
        model = _native_model(spec)
        shard_parameters(model, mesh, lambda k, p: (Shard(0),) if ".experts." in k else None)
        resident, storage = _load_alone(rank, world, vsd.checkpoint.files, lambda: model.load_state_dict(vsd))
    ranges = vsd.planned_ranges()
    ideal_pages = _ideal_pages(ranges)

    state = model.state_dict()
    for key, want in eager.items():
        got = state[key]
        if ".experts." in key:
            assert isinstance(got, DTensor) and got.placements == (Shard(0),), key
            n = want.shape[0]
            chunk = -(-n // world)
            lo, hi = min(rank * chunk, n), min((rank + 1) * chunk, n)
            assert got.to_local().shape[0] == hi - lo, key
            assert torch.equal(got.to_local(), want[lo:hi]), key
            assert torch.equal(got.full_tensor(), want), key  # union of all shards == full tensor
        else:
            assert not isinstance(got, DTensor) and torch.equal(got, want), key
    assert all(type(p) is torch.nn.Parameter or isinstance(p, DTensor) for p in model.parameters())
    experts = [k for k in vsd if ".experts." in k]
    return {
        "expert_bytes": sum(n for _, _, n in vsd.planned_ranges(experts)),
        "all_expert_bytes": sum(vsd.entry(k).nbytes for k in experts),
        "bytes_read": vsd.bytes_read,
        "planned": sum(n for _, _, n in ranges),
        "resident": resident,
        "storage": storage,
        "ideal_pages": ideal_pages,
        "header_bytes": vsd.checkpoint.header_bytes,
    }


def _check_ep(rank: int, world: int, paths: dict[str, str]) -> dict:
    """Every EP scenario of one world size in one set of processes (starting ranks is the slow part)."""
    scenarios = [("even", False), ("even", True), ("uneven", False)]
    return {s: _check_ep_one(rank, world, paths[s[0]], *s) for s in scenarios}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ep_mesh_reads_only_own_experts(ckpts: dict[str, Path], world: int) -> None:
    """Even and uneven expert counts, copy and assign=True: exact shards, exact reads."""
    by_rank = run_ranks(_check_ep, world, ({k: str(v) for k, v in ckpts.items()},))
    for scenario in by_rank[0]:
        results = [r[scenario] for r in by_rank]
        for rank, r in enumerate(results):
            # lazysd's own accounting equals the plan ...
            assert r["bytes_read"] == r["planned"], (scenario, rank, r)
            _assert_read_only_planned_pages(r, scenario, rank)
        # Ranks together read each expert byte exactly once; everything else every rank reads whole.
        assert sum(r["expert_bytes"] for r in results) == results[0]["all_expert_bytes"]
        assert len({r["bytes_read"] - r["expert_bytes"] for r in results}) == 1


def _check_2d_like(rank: int, world: int, path: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from lazysd import VirtualStateDict
    from lazysd.distributed import Target, local_box_of

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep_shard", "ep"))
    eager = _eager(path)

    def plan(key: str, param: torch.Tensor):  # noqa: ANN202
        if ".experts." in key:
            return (Shard(1), Shard(0))  # FSDP over ep_shard on dim 1, experts over ep
        if param.dim() == 2:
            return (Shard(0), Replicate())  # FSDP-style dense weights
        return None

    model = _native_model(SPEC)
    shard_parameters(model, mesh, plan)
    vsd = VirtualStateDict(path, like=model, share=None)  # each rank reads its whole plan
    resident, storage = _load_alone(rank, world, vsd.checkpoint.files, lambda: model.load_state_dict(vsd))
    for key, want in eager.items():
        got = model.state_dict()[key]
        placements = plan(key, want)
        if placements is None:
            assert torch.equal(got, want), key
            continue
        assert isinstance(got, DTensor) and tuple(got.placements) == placements, key
        box = local_box_of(tuple(want.shape), Target(mesh, placements))
        assert torch.equal(got.to_local(), want[tuple(slice(lo, hi) for lo, hi in box)]), key
        assert torch.equal(got.full_tensor(), want), key
    return {
        "bytes_read": vsd.bytes_read,
        "planned": sum(n for _, _, n in vsd.planned_ranges()),
        "resident": resident,
        "storage": storage,
        "ideal_pages": _ideal_pages(vsd.planned_ranges()),
    }


def test_2d_mesh_like_model_shard1_shard0(ckpts: dict[str, Path]) -> None:
    results = run_ranks(_check_2d_like, 4, (str(ckpts["even"]),))
    assert all(r["bytes_read"] == r["planned"] for r in results)
    # Column shards of gate/up are 32 bf16 (64 bytes) per row: whole pages are touched, so
    # the measure is against the page-level ideal.
    for r in results:
        _assert_read_only_planned_pages(r)
    # Shard(1) of native gate_and_up is a column slice of HF gate/up: ranks read disjoint columns.
    assert len({r["bytes_read"] for r in results}) == 1


def _check_errors(rank: int, world: int, path: str) -> str:
    from torch.distributed.device_mesh import init_device_mesh

    from lazysd import PlacementError, VirtualStateDict

    messages = []
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with pytest.raises(PlacementError) as info:
        VirtualStateDict(path, mesh)
    messages.append(str(info.value))
    model = _native_model(
        Step3p5Spec.tiny(
            hidden_size=128, moe_intermediate_size=64, moe_num_experts=4, share_expert_dim=32, intermediate_size=64
        )
    )
    with pytest.raises(PlacementError) as info:
        VirtualStateDict(path, like=model)
    messages.append(str(info.value))
    vsd = VirtualStateDict(path, mesh, ep_dim="tp")
    assert vsd["model.layers.1.moe.experts.down_projs"].to_local().shape[0] == 4
    from torch.distributed.device_mesh import DeviceMesh

    partial = DeviceMesh("cpu", [0, 1], mesh_dim_names=("ep",))  # ranks 2 and 3 are outside it
    if rank >= 2:
        with pytest.raises(PlacementError) as info:
            VirtualStateDict(path, partial)
        messages.append(str(info.value))
    return "\n".join(messages)


def test_errors(ckpts: dict[str, Path]) -> None:
    messages = run_ranks(_check_errors, 4, (str(ckpts["even"]),))
    assert "rank 2 is not part of the mesh (ranks [0, 1]); every loading rank must be" in messages[2]
    msg = messages[0]
    assert "the mesh has 2 dimensions ('dp', 'tp') and none is named 'ep'; pass ep_dim=" in msg
    assert "like= model parameters disagree with the checkpoint's native shapes:" in msg
    assert "model.layers.1.moe.experts.gate_and_up_projs: model [4, 128, 128], checkpoint [8, 128, 128]" in msg


def test_example_script_under_torchrun(tmp_path: Path) -> None:
    import os
    import re

    from tests.support.dist import torchrun

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TMPDIR": str(tmp_path)}
    out = torchrun(root / "examples" / "load_expert_parallel.py", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(re.findall(r"rank \d/2: [^\n]*?next token \d+", out.stdout))
    assert len(lines) == 2 and all(
        "<All keys matched successfully>" in line and "experts (4, 128, 128) of (8, 128, 128)" in line for line in lines
    )
    assert len({line.rsplit("next token", 1)[1] for line in lines}) == 1


def _check_family(rank: int, world: int, root: str) -> dict:
    """Every per-expert / grouped family under EP: exact shards, exact per-rank reads."""
    import gc

    from torch.distributed.device_mesh import init_device_mesh

    from lazysd import VirtualStateDict
    from lazysd.testing import families, load_hf_tensors
    from tests.support.measure import record_reads

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    out = {}
    for family in families.FAMILIES:
        spec = families.FamilySpec.tiny(family)
        path = Path(root) / family
        # Private copies: tensors still viewing the safetensors mapping would pin its pages.
        eager = families.eager_native(spec, {k: v.clone() for k, v in load_hf_tensors(path).items()})
        gc.collect()
        vsd = VirtualStateDict(path, mesh)
        experts = [k for k in vsd if vsd.entry(k).kind == "experts"]
        assert experts, family
        locals_ = {}
        reads = record_reads(vsd)
        resident, storage = _load_alone(
            rank,
            world,
            vsd.checkpoint.files,
            lambda: locals_.update({k: vsd[k].to_local().materialize() for k in experts}),  # noqa: B023 - called now
        )
        own: dict[str, tuple[int, int]] = {}  # key -> this rank's experts [lo, hi)
        for key in experts:
            n = eager[key].shape[0]
            chunk = -(-n // world)
            lo, hi = own[key] = min(rank * chunk, n), min((rank + 1) * chunk, n)
            assert torch.equal(locals_[key], eager[key][lo:hi]), (family, key)
        ranges = vsd.planned_ranges(experts)
        out[family] = {
            "read": vsd.bytes_read,
            "planned": sum(n for _, _, n in ranges),
            "all": sum(vsd.entry(k).nbytes for k in experts),
            "resident": resident,
            "storage": storage,
            "ideal_pages": _ideal_pages(ranges),
        }
        # Per-expert families: this rank opened only its own experts' HF tensors.
        if any(None in s.dims for k in experts for s in vsd.entry(k).sources):
            ours = [s.info.key for k in experts for s in vsd.entry(k).sources if own[k][0] <= s.start[0] < own[k][1]]
            mine = set(ours)
            assert len(mine) == len(ours)
            assert {key for key, _, _ in reads} == mine, family  # read exactly these HF tensors
    return out


def test_every_family_under_expert_parallelism(tmp_path: Path) -> None:
    from lazysd.testing import families

    for family in families.FAMILIES:
        families.make_family_checkpoint(tmp_path / family, families.FamilySpec.tiny(family))
    results = run_ranks(_check_family, 2, (str(tmp_path),))
    for family in families.FAMILIES:
        per_rank = [r[family] for r in results]
        assert all(r["read"] == r["planned"] for r in per_rank), (family, per_rank)
        assert sum(r["read"] for r in per_rank) == per_rank[0]["all"], (family, per_rank)
        for rank, r in enumerate(per_rank):
            _assert_read_only_planned_pages(r, family, rank)
