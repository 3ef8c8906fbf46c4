"""lazysd.dcp: torch.distributed.checkpoint reading and writing HF checkpoints, on real gloo ranks.

Loads go through ``dcp.load`` with DCP's own ``DefaultLoadPlanner``; every local shard must be
bitwise equal to the same box of the VirtualStateDict's full tensor, and every rank must read
exactly the bytes lazysd's plan gives for its shards.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from lazysd import VirtualStateDict
from lazysd.dcp import HFReader
from lazysd.testing import Step3p5Spec, make_checkpoint
from tests.support.checks import same_bits
from tests.support.dist import run_ranks

# 6 experts: split over 4 ranks they are uneven (2, 2, 2, 0: one rank holds none).
SPEC = Step3p5Spec.tiny(hidden_size=128, moe_intermediate_size=64, moe_num_experts=6, share_expert_dim=32, intermediate_size=64)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
EXPERTS = ("experts.gate_and_up_projs", "experts.down_projs")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("dcp") / "src", SPEC, layout="split", seed=3)


def _full(path: str | Path, **options: object) -> dict[str, torch.Tensor]:
    with VirtualStateDict(path, threads=0, **options) as vsd:
        return {k: v.materialize() for k, v in vsd.items()}


def _empty_like_checkpoint(path: str | Path, **options: object) -> dict[str, torch.Tensor]:
    with VirtualStateDict(path, **options) as vsd:
        return {k: torch.full(e.shape, -7, dtype=vsd.dtype_of(e)) for k, e in vsd.plan.entries.items()}


# ---- single process --------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [0, 4])  # items read in turn / several at once
def test_native_load_matches_virtual_state_dict(ckpt: Path, threads: int) -> None:
    sd = _empty_like_checkpoint(ckpt)
    reader = HFReader(ckpt, threads=threads)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    want = _full(ckpt)
    assert list(sd) == list(want)
    for k in want:
        assert same_bits(sd[k], want[k]), k
    assert reader.bytes_read == sum(e.nbytes for e in reader.vsd.plan.entries.values())


def test_native_load_casts_and_partial(ckpt: Path) -> None:
    """dtype= describes the cast tensors; a partial state dict reads only its keys' bytes."""
    want = _full(ckpt, dtype=torch.float32)
    keys = ["model.layers.1.moe.experts.down_projs", "model.layers.1.moe.gate.e_score_correction_bias", "model.embed_tokens.weight"]
    sd = {k: torch.empty(want[k].shape, dtype=want[k].dtype) for k in keys}
    reader = HFReader(ckpt, dtype=torch.float32)
    meta = reader.read_metadata()
    assert meta.state_dict_metadata[keys[0]].properties.dtype == torch.float32
    assert meta.state_dict_metadata[keys[1]].properties.dtype == torch.float32  # pinned fp32 bias
    dcp.load(sd, storage_reader=reader, no_dist=True)
    for k in keys:
        assert same_bits(sd[k], want[k]), k
    # Read in the checkpoint's bf16, cast as filled: half the bytes of the fp32 result.
    assert reader.bytes_read == sum(reader.vsd.plan.entries[k].nbytes for k in keys)


def test_destination_of_another_dtype_is_cast_like_torch(ckpt: Path) -> None:
    want = _full(ckpt)
    key = "model.layers.1.moe.experts.gate_and_up_projs"
    sd = {key: torch.empty(want[key].shape, dtype=torch.float32)}
    dcp.load(sd, storage_reader=HFReader(ckpt), no_dist=True)
    assert torch.equal(sd[key], want[key].float())


def test_metadata_from_headers_only(ckpt: Path) -> None:
    reader = HFReader(ckpt)
    meta = reader.read_metadata()
    assert reader.bytes_read == 0
    md = meta.state_dict_metadata["model.layers.1.moe.experts.gate_and_up_projs"]
    E, D, I = SPEC.moe_num_experts, SPEC.hidden_size, SPEC.moe_intermediate_size
    assert tuple(md.size) == (E, D, 2 * I) and md.properties.dtype == torch.bfloat16
    assert [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks] == [((0, 0, 0), (E, D, 2 * I))]
    assert meta.storage_meta.load_id == reader.load_id
    hf = HFReader(ckpt, native=False).read_metadata()
    assert "model.layers.1.moe.gate_proj.weight" in hf.state_dict_metadata
    assert "model.layers.1.moe.experts.gate_and_up_projs" not in hf.state_dict_metadata


def test_missing_and_mismatched_keys_fail_before_reading(ckpt: Path) -> None:
    reader = HFReader(ckpt)
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: model.nope"):
        dcp.load({"model.nope": torch.empty(2)}, storage_reader=reader, no_dist=True)
    key = "model.layers.1.moe.experts.down_projs"
    with pytest.raises(CheckpointException, match="Size mismatch"):
        dcp.load({key: torch.empty(3, 3)}, storage_reader=reader, no_dist=True)
    assert reader.bytes_read == 0


def test_native_false_rejects_native_options(ckpt: Path) -> None:
    with pytest.raises(TypeError, match="adapter, include_mtp only apply with native=True"):
        HFReader(ckpt, native=False, adapter="step3p5", include_mtp=True)


def test_reset_opens_another_checkpoint(ckpt: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", SPEC, layout="single", seed=9)
    reader = HFReader(ckpt)
    first = reader.load_id
    sd = _empty_like_checkpoint(other)
    dcp.load(sd, storage_reader=reader, checkpoint_id=other, no_dist=True)
    assert reader.path == other.absolute() and reader.load_id != first
    want = _full(other)
    assert all(same_bits(sd[k], want[k]) for k in want)
    assert HFReader.validate_checkpoint_id(other) and not HFReader.validate_checkpoint_id(tmp_path / "missing")


def test_native_false_matches_torch_reader(ckpt: Path) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = HFReader(ckpt, native=False).read_metadata()
    keys = list(meta.state_dict_metadata)
    ours = {k: torch.empty(meta.state_dict_metadata[k].size, dtype=meta.state_dict_metadata[k].properties.dtype) for k in keys}
    theirs = {k: torch.empty_like(v) for k, v in ours.items()}
    reader = HFReader(ckpt, native=False)
    dcp.load(ours, storage_reader=reader, no_dist=True)
    dcp.load(theirs, storage_reader=HuggingFaceStorageReader(str(ckpt)), no_dist=True)
    torch_meta = HuggingFaceStorageReader(str(ckpt)).read_metadata()
    assert set(torch_meta.state_dict_metadata) == set(keys)
    for k in keys:
        assert torch_meta.state_dict_metadata[k].size == meta.state_dict_metadata[k].size, k
        assert torch_meta.state_dict_metadata[k].properties.dtype == meta.state_dict_metadata[k].properties.dtype, k
        assert same_bits(ours[k], theirs[k]), k
    assert reader.bytes_read == sum(t.nbytes for t in ours.values())


# ---- real ranks --------------------------------------------------------------------------------


def _placed(shape: tuple[int, ...], dtype: torch.dtype, mesh, placements) -> torch.Tensor:
    """An (unfilled) DTensor of ``shape`` with this rank's local shard, by DTensor's chunking."""
    from torch.distributed.tensor import DTensor

    from lazysd.distributed import Target, contiguous_stride, local_box_of

    box = local_box_of(shape, Target(mesh, tuple(placements)))
    local = torch.full([h - l for l, h in box], -7, dtype=dtype)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=contiguous_stride(shape))


def _fsdp_ep(key: str, shape: tuple[int, ...], mesh, expert_fsdp: bool):
    """FSDP x EP on a ("dp", "ep") mesh: experts Shard(0) on ep (and Shard(1) on dp with
    ``expert_fsdp``), other matrices Shard(0) over both dims, vectors plain."""
    from torch.distributed.tensor import Replicate, Shard

    if key.endswith(EXPERTS):
        return [Shard(1) if expert_fsdp else Replicate(), Shard(0)]
    if len(shape) >= 2:
        return [Shard(0), Shard(0)]
    return None


def _tp(key: str, shape: tuple[int, ...], mesh):
    """Megatron-style TP on a 1-D mesh: column-parallel Shard(0), row-parallel Shard(1);
    gate_and_up split on its output (concat) dim, down_projs by experts; vectors plain."""
    from torch.distributed.tensor import Shard

    if key.endswith("experts.gate_and_up_projs"):
        return [Shard(2)]
    if key.endswith("experts.down_projs"):
        return [Shard(0)]
    if key.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight")):
        return [Shard(1)]
    if len(shape) >= 2 and "moe.gate" not in key:
        return [Shard(0)]
    return None


def _load_case(path: str, make_mesh, layout) -> tuple[int, int]:
    """dcp.load into DTensors placed by ``layout``; check every shard against the full tensor."""
    from torch.distributed.tensor import DTensor

    from lazysd.distributed import Target, local_box_of

    mesh = make_mesh()
    with VirtualStateDict(path) as vsd:
        sd: dict[str, torch.Tensor] = {}
        for key, e in vsd.plan.entries.items():
            placements = layout(key, e.shape, mesh)
            sd[key] = torch.full(e.shape, -7, dtype=e.dtype) if placements is None else _placed(e.shape, e.dtype, mesh, placements)
    with HFReader(path) as reader:
        dcp.load(sd, storage_reader=reader)
        read = reader.bytes_read
    full = _full(path)
    for key, value in sd.items():
        if isinstance(value, DTensor):
            box = local_box_of(tuple(value.shape), Target(value.device_mesh, tuple(value.placements)))
            want = full[key][tuple(slice(lo, hi) for lo, hi in box)]
            assert same_bits(value.to_local(), want), key
        else:
            assert same_bits(value, full[key]), key
    # The bytes lazysd's own plan gives for these shards (the VirtualStateDict's, like=sd).
    with VirtualStateDict(path, like=sd) as planned:
        want_bytes = sum(n for _, _, n in planned.planned_ranges())
    assert read == want_bytes, (read, want_bytes)
    return read, sum(e.nbytes for e in VirtualStateDict(path).plan.entries.values())


def _hf_case(path: str, world: int) -> int:
    """native=False and torch's HuggingFaceStorageReader load the same HF-keyed DTensors."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    meta = HFReader(path, native=False).read_metadata().state_dict_metadata

    def fresh() -> dict[str, torch.Tensor]:
        return {
            k: _placed(tuple(m.size), m.properties.dtype, mesh, [Shard(0)]) if len(m.size) >= 2 else torch.full(m.size, -7, dtype=m.properties.dtype)
            for k, m in meta.items()
        }

    ours, theirs = fresh(), fresh()
    with HFReader(path, native=False) as reader:
        dcp.load(ours, storage_reader=reader)
        read = reader.bytes_read
    dcp.load(theirs, storage_reader=HuggingFaceStorageReader(path))
    for k in meta:
        a, b = ours[k], theirs[k]
        assert type(a) is type(b) and a.shape == b.shape, k
        assert same_bits(getattr(a, "_local_tensor", a), getattr(b, "_local_tensor", b)), k
    local = sum(getattr(t, "_local_tensor", t).nbytes for t in ours.values())
    assert read == local, (read, local)  # exactly the local shards, nothing around them
    return read


def _save_case(path: str, out: str, make_mesh, layout) -> int:
    """dcp.save of DTensors placed by ``layout`` (values from the checkpoint) through HFWriter."""
    from torch.distributed.tensor import DTensor

    from lazysd.dcp import HFWriter
    from lazysd.distributed import Target, contiguous_stride, local_box_of

    mesh = make_mesh()
    sd: dict[str, torch.Tensor] = {}
    for key, full in _full(path).items():
        placements = layout(key, tuple(full.shape), mesh)
        if placements is None:
            sd[key] = full
            continue
        box = local_box_of(tuple(full.shape), Target(mesh, tuple(placements)))
        local = full[tuple(slice(lo, hi) for lo, hi in box)].clone()
        sd[key] = DTensor.from_local(local, mesh, placements, run_check=False, shape=full.shape, stride=contiguous_stride(tuple(full.shape)))
    writer = HFWriter(out, adapter="step3p5", config=Path(path) / "config.json", max_shard_size="40KB")
    dcp.save(sd, storage_writer=writer)
    return writer.bytes_written


def _ranks_worker(rank: int, world: int, path: str, out: str) -> dict[str, tuple[int, int] | int]:
    from functools import partial

    from torch.distributed.device_mesh import init_device_mesh

    mesh2d = partial(init_device_mesh, "cpu", (2, world // 2), mesh_dim_names=("dp", "ep"))
    mesh1d = partial(init_device_mesh, "cpu", (world,), mesh_dim_names=("tp",))
    return {
        "fsdp_ep": _load_case(path, mesh2d, lambda k, s, m: _fsdp_ep(k, s, m, expert_fsdp=True)),
        "ep_only": _load_case(path, mesh2d, lambda k, s, m: _fsdp_ep(k, s, m, expert_fsdp=False)),
        "tp": _load_case(path, mesh1d, _tp),
        "hf": _hf_case(path, world),
        "save_fsdp_ep": _save_case(path, f"{out}/fsdp_ep", mesh2d, lambda k, s, m: _fsdp_ep(k, s, m, expert_fsdp=True)),
        "save_tp": _save_case(path, f"{out}/tp", mesh1d, _tp),
    }


@pytest.mark.parametrize("world", [2, 4])
def test_dcp_on_ranks(ckpt: Path, tmp_path: Path, world: int) -> None:
    from lazysd import save_hf

    results = run_ranks(_ranks_worker, world, (str(ckpt), str(tmp_path)), timeout=300)
    total = results[0]["fsdp_ep"][1]
    # Sharded loads split the reading: together the ranks read about the checkpoint once
    # (vectors, left plain, are read by every rank), never each the whole of it.
    fsdp = [r["fsdp_ep"][0] for r in results]
    assert max(fsdp) < total * 0.75 and sum(fsdp) < total * 1.1
    assert all(r["tp"][0] < total * 0.75 for r in results)
    # Saves: byte-identical to a single-process save_hf of the full state; each byte written
    # once, by the rank holding it (DCP spreads replicated vectors over the ranks).
    save_hf(_full(ckpt), tmp_path / "ref", adapter="step3p5", config=ckpt / "config.json", max_shard_size="40KB")
    for case in ("fsdp_ep", "tp"):
        _same_dirs(tmp_path / case, tmp_path / "ref")
        wrote = [r[f"save_{case}"] for r in results]
        assert sum(wrote) == total and max(wrote) < total * 0.75, (case, wrote)


# ---- HFWriter --------------------------------------------------------------------------------


def _same_dirs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_writer_matches_save_hf(ckpt: Path, tmp_path: Path) -> None:
    from lazysd import save_hf
    from lazysd.dcp import HFWriter

    sd = _full(ckpt, include_mtp=True)
    save_hf(sd, tmp_path / "ref", adapter="step3p5", config=ckpt / "config.json", max_shard_size="40KB", num_layers=SPEC.num_hidden_layers)
    writer = HFWriter(tmp_path / "dcp", adapter="step3p5", config=ckpt / "config.json", max_shard_size="40KB")
    dcp.save(sd, storage_writer=writer, no_dist=True)
    _same_dirs(tmp_path / "dcp", tmp_path / "ref")
    assert len(list((tmp_path / "dcp").glob("model-*.safetensors"))) > 2
    assert writer.bytes_written == sum(t.nbytes for t in sd.values())
    # ... and it reads back to the same native tensors.
    back = _full(tmp_path / "dcp", include_mtp=True)
    assert all(same_bits(back[k], sd[k]) for k in sd)


def test_writer_casts_like_save_hf(ckpt: Path, tmp_path: Path) -> None:
    from lazysd import save_hf
    from lazysd.dcp import HFWriter

    sd = _full(ckpt)
    save_hf(sd, tmp_path / "ref", adapter="step3p5", dtype=torch.float16)
    dcp.save(sd, storage_writer=HFWriter(tmp_path / "dcp", adapter="step3p5", dtype=torch.float16), no_dist=True)
    _same_dirs(tmp_path / "dcp", tmp_path / "ref")


def test_writer_refusals(ckpt: Path, tmp_path: Path) -> None:
    from lazysd.dcp import HFWriter
    from lazysd.errors import ExportError

    sd = _full(ckpt)
    with pytest.raises(CheckpointException, match="exists and is not empty"):
        dcp.save(sd, storage_writer=HFWriter(ckpt, adapter="step3p5"), no_dist=True)
    with pytest.raises(CheckpointException, match="'step' is not a tensor"):
        dcp.save({**sd, "step": 3}, storage_writer=HFWriter(tmp_path / "a", adapter="step3p5"), no_dist=True)
    with pytest.raises(CheckpointException, match="model.extra.weight.*matches no rule"):
        dcp.save({**sd, "model.extra.weight": torch.ones(2)}, storage_writer=HFWriter(tmp_path / "b", adapter="step3p5"), no_dist=True)
    with pytest.raises(ExportError, match="not a file"):
        HFWriter(tmp_path / "c", adapter="step3p5", config=tmp_path / "missing.json")
    assert list(tmp_path.iterdir()) == []  # nothing made, no lock left behind


def _killed_save(rank: int, world: int, path: str, out: str, victim: int) -> None:
    """dcp.save through HFWriter whose ``victim`` rank is SIGKILLed in the middle of writing."""
    import os
    import signal

    from torch.distributed.checkpoint import DefaultSavePlanner

    from lazysd.dcp import HFWriter

    class KillMidWrite(DefaultSavePlanner):
        written = 0

        def resolve_data(self, write_item):
            if rank == victim:
                self.written += 1
                if self.written > 3:  # a few items are on disk already
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().resolve_data(write_item)

    writer = HFWriter(out, adapter="step3p5", config=Path(path) / "config.json", max_shard_size="40KB")
    dcp.save(_full(path), storage_writer=writer, planner=KillMidWrite())


@pytest.mark.parametrize(("world", "victim"), [(1, 0), (2, 1)])
def test_killed_save_leaves_nothing_complete(ckpt: Path, tmp_path: Path, world: int, victim: int) -> None:
    from lazysd import save_hf
    from lazysd.dcp import HFWriter

    out = tmp_path / "out"
    with pytest.raises(Exception, match="SIGKILL"):
        run_ranks(_killed_save, world, (str(ckpt), str(out), victim), timeout=120)
    # No output directory at all: only hidden siblings (the stage, perhaps the lock file).
    assert not out.exists()
    assert all(p.name.startswith(".out.lazysd-") for p in tmp_path.iterdir() if p.name != "out"), sorted(p.name for p in tmp_path.iterdir())
    # A later save into it removes the leftovers and writes a complete checkpoint.
    sd = _full(ckpt)
    dcp.save(sd, storage_writer=HFWriter(out, adapter="step3p5", config=ckpt / "config.json", max_shard_size="40KB"), no_dist=True)
    save_hf(sd, tmp_path / "ref", adapter="step3p5", config=ckpt / "config.json", max_shard_size="40KB")
    _same_dirs(out, tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]


def test_failed_write_removes_its_temporaries(ckpt: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint import DefaultSavePlanner

    from lazysd.dcp import HFWriter

    class FailMidWrite(DefaultSavePlanner):
        written = 0

        def resolve_data(self, write_item):
            self.written += 1
            if self.written > 3:
                raise OSError(28, "No space left on device")
            return super().resolve_data(write_item)

    out = tmp_path / "out"
    with pytest.raises(CheckpointException, match="No space left on device"):
        dcp.save(_full(ckpt), storage_writer=HFWriter(out, adapter="step3p5", max_shard_size="40KB"), planner=FailMidWrite(), no_dist=True)
    assert list(tmp_path.iterdir()) == []  # no output, no stage, no lock left behind


def _run_recipe(rank: int, world: int, code: str, src: str, out: str) -> None:
    """Run the README script as written, except that the rank's process group exists already
    (the fork server's, rather than torchrun's); its init and destroy calls are no-ops here."""
    import sys
    from unittest import mock

    import torch.distributed as dist

    with mock.patch.object(sys, "argv", ["dcp_fsdp_ep.py", src, out]), mock.patch.object(dist, "init_process_group"), mock.patch.object(
        dist, "destroy_process_group"
    ):
        exec(compile(code, "dcp_fsdp_ep.py", "exec"), {"__name__": "__main__"})  # noqa: S102 - the README's own code


def test_readme_recipe_runs(tmp_path: Path) -> None:
    """The README's FSDP2 x EP recipe on 2 gloo ranks: the checkpoint it exports holds the
    source's tensors bit for bit."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("```python\n# dcp_fsdp_ep.py\n") + len("```python\n")
    code = readme[start : readme.index("```", start)]
    src = make_checkpoint(tmp_path / "src", Step3p5Spec.tiny(), layout="sharded", seed=4)
    run_ranks(_run_recipe, 2, (code, str(src), str(tmp_path / "out")), timeout=300)
    got, want = _full(tmp_path / "out"), _full(src)
    assert list(got) == list(want)
    assert all(same_bits(got[k], want[k]) for k in want)


def test_native_false_needs_no_config(ckpt: Path, tmp_path: Path) -> None:
    """Like torch's reader, native=False reads a directory of shards without config.json."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            shutil.copy(f, bare / f.name)
    meta = HFReader(bare, native=False).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(sd, storage_reader=HFReader(bare, native=False), no_dist=True)
    want = {k: torch.empty_like(v) for k, v in sd.items()}
    dcp.load(want, storage_reader=HFReader(ckpt, native=False), no_dist=True)
    assert all(same_bits(sd[k], want[k]) for k in want)


@pytest.mark.parametrize("fp8", ["dequantize", "keep"])
def test_per_expert_fp8_family_with_mtp(tmp_path: Path, fp8: str) -> None:
    """DeepSeek-V3's FP8 release layout: experts stacked from per-expert keys, block scales
    multiplied in (or kept beside the weights), MTP layers included; the same as the mapping."""
    from lazysd.testing.families import FamilySpec, make_family_checkpoint

    src = make_family_checkpoint(tmp_path / "ds", FamilySpec.tiny("deepseek_v3", fp8=True), seed=2)
    options = {"include_mtp": True, "fp8": fp8}
    want = _full(src, **options)
    assert any(k.startswith("mtp.") for k in want) and any(".experts." in k for k in want)
    sd = {k: torch.empty_like(v) for k, v in want.items()}
    reader = HFReader(src, **options)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    assert all(same_bits(sd[k], want[k]) for k in want)
    assert reader.bytes_read == sum(n for _, _, n in reader.vsd.planned_ranges())
    # ... and written back by HFWriter exactly as save_hf writes it (FP8 and scales kept).
    import json

    from lazysd import save_hf
    from lazysd.dcp import HFWriter

    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    save_hf(sd, tmp_path / "ref", adapter="deepseek_v3", config=src / "config.json", max_shard_size="100KB", num_layers=layers)
    dcp.save(sd, storage_writer=HFWriter(tmp_path / "out", adapter="deepseek_v3", config=src / "config.json", max_shard_size="100KB"), no_dist=True)
    _same_dirs(tmp_path / "out", tmp_path / "ref")


def _failing_save(rank: int, world: int, path: str, out: str) -> str:
    """dcp.save whose rank 1 fails while writing: every rank must raise, nothing be committed."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    from lazysd.dcp import HFWriter

    class FailOnRank1(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if rank == 1:
                raise OSError(28, "No space left on device")
            return super().resolve_data(write_item)

    try:
        dcp.save(_full(path), storage_writer=HFWriter(out, adapter="step3p5", max_shard_size="40KB"), planner=FailOnRank1())
    except CheckpointException as e:
        return str(e)
    return "saved"


def test_failed_rank_aborts_every_rank(ckpt: Path, tmp_path: Path) -> None:
    messages = run_ranks(_failing_save, 2, (str(ckpt), str(tmp_path / "out")), timeout=120)
    assert all("No space left on device" in m for m in messages), messages
    assert list(tmp_path.iterdir()) == []  # no output, no stage, no lock


def test_native_false_casts_with_dtype(ckpt: Path) -> None:
    """dtype= with HF keys: described and read as fp32, the values those of the stored bf16."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    meta = HFReader(ckpt, native=False, dtype=torch.float32).read_metadata().state_dict_metadata
    assert {m.properties.dtype for m in meta.values()} == {torch.float32}  # the tiny checkpoint: floats only
    sd = {k: torch.empty(m.size, dtype=torch.float32) for k, m in meta.items()}
    dcp.load(sd, storage_reader=HFReader(ckpt, native=False, dtype=torch.float32), no_dist=True)
    theirs = {k: torch.empty_like(v) for k, v in sd.items()}  # torch's reader casts on copy_
    dcp.load(theirs, storage_reader=HuggingFaceStorageReader(str(ckpt)), no_dist=True)
    assert all(same_bits(sd[k], theirs[k]) for k in sd)
