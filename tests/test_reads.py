"""The byte-level read plan: dry-run counts are the reader's actual reads, item by item.

``rank_plan``/``explain`` (lazysd.dryrun), ``planned_ranges`` and the reader all derive from
``lazysd.reads.plan_reads``; these tests hold the counts and ranges against what the reader
really reads (every read goes through ``Checkpoint.read_batch``, recorded here) on a
Flash-shaped Step3p5 checkpoint and an FP8 DeepSeek-V3 one, over EP x ep_shard layouts.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from lazysd import VirtualStateDict
from lazysd.dryrun import EPLayout
from lazysd.geometry import Block, box_shape, byte_runs, full_box, run_count, shard_box, source_placements
from lazysd.reads import Destination, plan_reads, read_totals, source_ranges
from lazysd.testing import Step3p5Spec, make_checkpoint
from lazysd.testing.families import FamilySpec, make_family_checkpoint
from tests.support.measure import record_reads

# Flash's structure (3 dense layers then MoE, MTP layers after, sliding layers with more query
# heads than full ones, an uneven expert count for the EP sizes below), small sizes.
FLASH_SHAPED = Step3p5Spec(
    num_hidden_layers=5,
    num_nextn_predict_layers=1,
    first_dense_layers=3,
    moe_num_experts=18,
    moe_intermediate_size=40,
    share_expert_dim=40,
    hidden_size=128,
    intermediate_size=176,
    num_attention_heads=4,
    num_attention_groups=2,
    sliding_num_attention_heads=6,
    head_dim=16,
    vocab_size=200,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reads")
    return {
        "flash": make_checkpoint(root / "flash", FLASH_SHAPED, layout="split"),
        "fp8": make_family_checkpoint(root / "fp8", FamilySpec.tiny("deepseek_v3", fp8=True)),
    }


LAYOUTS = [(1, 1, False), (4, 1, False), (3, 2, False), (2, 2, True)]


@pytest.mark.parametrize(
    ("name", "dtype", "chunk"),
    [("flash", None, 8 << 20), ("flash", torch.float32, 4096), ("fp8", None, 8 << 20), ("fp8", None, 16384)],
)
def test_dry_run_counts_are_the_reads(
    checkpoints: dict[str, Path], name: str, dtype: torch.dtype | None, chunk: int
) -> None:
    """Per rank of each layout: planned bytes, runs and ranges == what materializing its boxes reads."""
    with VirtualStateDict(checkpoints[name], threads=0, dtype=dtype, chunk_bytes=chunk, include_mtp=True) as vsd:
        reads = record_reads(vsd)
        for ep, ep_shard, fsdp in LAYOUTS:
            plan = vsd.rank_plan(ep, ep_shard=ep_shard, fsdp=fsdp)
            assert vsd.bytes_read == 0 and not reads  # planned from headers
            for r in plan.ranks:
                got: Counter[tuple[str, int, int]] = Counter()
                want: Counter[tuple[str, int, int]] = Counter()
                before = (vsd.bytes_read, vsd.checkpoint.read_calls)
                for key, box in plan.boxes(r.rank).items():
                    vsd.lazy(vsd.entry(key), box).materialize()
                    for sr in plan.reads(r.rank, key):
                        for item in sr.items:
                            want.update((item.source.key, s, n) for s, n in item.runs)
                            if item.scale is not None:
                                want.update((item.scale.source.key, s, n) for s, n in item.scale.runs)
                got.update(reads)
                reads.clear()
                assert vsd.bytes_read - before[0] == r.nbytes, (ep, ep_shard, r.rank)
                assert vsd.checkpoint.read_calls - before[1] == r.runs, (ep, ep_shard, r.rank)
                assert got == want, (ep, ep_shard, r.rank)
            vsd.checkpoint.bytes_read = 0  # the next layout's check starts from zero
        if name == "fp8":  # scale blocks are part of the counts
            assert any(k.endswith("_scale_inv") for k in vsd.checkpoint.tensors)


def test_planned_ranges_and_progress_total_are_the_items(checkpoints: dict[str, Path]) -> None:
    with VirtualStateDict(checkpoints["fp8"], threads=0, chunk_bytes=2048) as vsd:
        planned = vsd.planned_ranges()
        total = sum(vsd._totals(k).dest_bytes for k in vsd)
        assert total == sum(vsd.entry(k).numel * vsd.dtype_of(vsd.entry(k)).itemsize for k in vsd)
        reads = record_reads(vsd)
        for key in vsd:
            vsd[key].materialize()
        assert sum(n for _, _, n in planned) == vsd.bytes_read
        files = {str(i.file): i for i in vsd.checkpoint.tensors.values()}
        assert len(planned) == len(reads) and all(f in files for f, _, _ in planned)
        assert vsd.stats.bytes_out == total


def test_items_tile_the_box_and_totals_count_them(checkpoints: dict[str, Path]) -> None:
    with VirtualStateDict(checkpoints["flash"]) as vsd:
        for key in vsd:
            entry = vsd.entry(key)
            for box in (full_box(entry.shape), EPLayout(3, 2).box(entry, 4)):
                for dest in (Destination(entry.dtype), Destination(torch.float32), Destination(entry.dtype, "cuda")):
                    items = plan_reads(entry, box, dest, chunk_bytes=4096)
                    covered = torch.zeros(box_shape(box), dtype=torch.int32)
                    for item in items:
                        covered[tuple(slice(lo, hi) for lo, hi in item.dest_box)] += 1
                        assert box_shape(item.dest_box) == tuple(
                            1 if d is None else box_shape(item.source_box)[d] for d in item.dims
                        )
                        assert item.method == "staged" or dest.device == "cpu"
                    assert bool((covered == 1).all()), key
                    t = read_totals(entry, box, dest, chunk_bytes=4096)
                    assert (t.items, t.nbytes, t.runs) == (
                        len(items),
                        sum(i.nbytes for i in items),
                        sum(i.run_count for i in items),
                    )
                    assert t.dest_bytes == covered.numel() * dest.dtype.itemsize


def test_a_plan_is_cut_in_shares_once(tmp_path: Path) -> None:
    """SHARES chunks a plan: a tensor stacked from 4 or more per-expert sources is read a
    source at a time (chunks enough for the threads), one or two sources are cut further."""
    # 2 MiB bf16 experts: 4 x SHARE_MIN.
    spec = FamilySpec(
        family="qwen3_moe",
        num_hidden_layers=1,
        first_dense=0,
        num_experts=4,
        hidden_size=1024,
        moe_intermediate_size=1024,
    )
    with VirtualStateDict(make_family_checkpoint(tmp_path, spec)) as vsd:
        for key, sources in (("gate_and_up_projs", 8), ("down_projs", 4)):
            entry = vsd.entry(f"model.layers.0.mlp.experts.{key}")
            dest = Destination(entry.dtype)
            whole = plan_reads(entry, full_box(entry.shape), dest)
            assert len(whole) == sources and all(i.data_bytes == 2 << 20 for i in whole), key
            one_expert = ((1, 2), *full_box(entry.shape)[1:])
            cut = plan_reads(entry, one_expert, dest)
            # One expert is 2 sources (gate, up) cut in 2 each, or 1 (down) cut in SHARES.
            assert len(cut) == 4 and {i.data_bytes for i in cut} == {(2 << 20) * sources // 16}, key


def test_sources_alike_share_their_chunks(checkpoints: dict[str, Path]) -> None:
    """A plan works its chunks out once for the sources that share a geometry (a stacked
    value's experts) and moves them into each one's region: the same chunks as working
    each source out on its own, for whole values, EP boxes (which start inside the value),
    casts, other devices and small chunks."""
    from lazysd.reads import _chunks, _chunks_shared, _sources

    shared = 0
    for name in checkpoints:
        with VirtualStateDict(checkpoints[name]) as vsd:
            for key in vsd:
                entry = vsd.entry(key)
                boxes = (full_box(entry.shape), EPLayout(3, 2).box(entry, 4), EPLayout(2, 1).box(entry, 1))
                dests = (Destination(entry.dtype), Destination(torch.float32), Destination(entry.dtype, "cuda"))
                for box, dest, (chunk, shares) in itertools.product(boxes, dests, ((8 << 20, 4), (4096, 1))):
                    cpu, seen = dest.device == "cpu", {}
                    sources, n = _sources(entry, box, shares)
                    for src, found in sources:
                        alone = list(_chunks(src, found, box, dest, cpu, chunk, n))
                        assert list(_chunks_shared(src, found, box, dest, cpu, chunk, n, seen)) == alone, (key, box)
                    shared += len(sources) - len(seen) if len(sources) > 1 else 0
    assert shared > 0


def test_source_ranges_are_what_any_plan_reads(checkpoints: dict[str, Path]) -> None:
    """``source_ranges`` (no items built) covers exactly the bytes of the plan's items, FP8
    scales included, whatever the chunking: the windows a reader's own values make are the
    bytes it reads."""
    for name in ("flash", "fp8"):
        with VirtualStateDict(checkpoints[name]) as vsd:
            for key in vsd:
                entry = vsd.entry(key)
                for box in (full_box(entry.shape), EPLayout(4).box(entry, 1), EPLayout(3, 2).box(entry, 4)):
                    planned = [
                        r
                        for chunk in (4096, 8 << 20)
                        for i in plan_reads(entry, box, Destination(entry.dtype), chunk_bytes=chunk)
                        for r in i.ranges()
                    ]
                    assert _merged(source_ranges(entry, box)) == _merged(planned), (name, key, box)


def _merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``(file, offset, length)`` ranges merged where they touch or overlap, sorted."""
    out: list[list] = []
    for f, o, n in sorted(r for r in ranges if r[2] > 0):
        if out and out[-1][0] == f and o <= out[-1][1] + out[-1][2]:
            out[-1][2] = max(out[-1][2], o + n - out[-1][1])
        else:
            out.append([f, o, n])
    return [tuple(r) for r in out]


def test_read_ahead_windows_hold_only_a_ranks_own_bytes(checkpoints: dict[str, Path]) -> None:
    """The windows a rank's reader reads ahead (:func:`lazysd.prefetch.rank_windows` over its
    own values) hold its own bytes only, never a byte of another rank's experts, and run
    across tensors that lie side by side in a file."""
    from lazysd.prefetch import rank_windows

    with VirtualStateDict(checkpoints["flash"]) as vsd:
        layout = EPLayout(4)
        boxes = {key: layout.box(vsd.entry(key), 1) for key in vsd}
        mine = [r for key, box in boxes.items() for r in source_ranges(vsd.entry(key), box)]
        windows = rank_windows([(0, *r) for r in mine], least=1)
        own = _merged(mine)
        for f, lo, hi in windows:  # inside one merged run of own bytes
            assert any(g == f and o <= lo and hi <= o + n for g, o, n in own), (f, lo, hi)
        others = {
            r
            for rank in (0, 2, 3)
            for key in vsd
            for r in source_ranges(vsd.entry(key), layout.box(vsd.entry(key), rank))
        }
        for f, o, n in others - set(mine):  # replicated tensors are every rank's
            assert all(hi <= o or o + n <= lo for g, lo, hi in windows if g == f), (f, o, n)
        sizes = {(str(s.info.file), s.info.offset): s.info.nbytes for e in vsd.plan.entries.values() for s in e.sources}
        assert any(hi - lo > max(sizes.values()) for _, lo, hi in windows)  # across tensors


def test_items_describe_themselves(checkpoints: dict[str, Path]) -> None:
    """File, absolute offsets and lengths in an item are enough to fetch its bytes elsewhere."""
    with VirtualStateDict(checkpoints["flash"]) as vsd:
        key = "model.layers.3.moe.experts.down_projs"
        box = EPLayout(4).box(vsd.entry(key), 1)
        want = vsd.lazy(vsd.entry(key), box).materialize()
        out = torch.empty_like(want)
        for item in vsd.reader.plan(vsd.entry(key), box):
            data = bytearray()
            with open(item.source.file, "rb") as f:
                for _, offset, n in item.ranges():
                    f.seek(offset)
                    data += f.read(n)
            block = torch.frombuffer(data, dtype=item.source.dtype).view(box_shape(item.source_box))
            perm = [d for d in item.dims if d is not None]
            view = out[tuple(slice(lo, hi) for lo, hi in item.dest_box)]
            view.copy_(block.permute([perm.index(d) for d in range(len(perm))]).reshape(view.shape))
        assert torch.equal(out, want)


def test_byte_runs_and_counts() -> None:
    shape = (3, 4, 5)
    dims = [[(lo, hi) for lo in range(n) for hi in range(lo + 1, n + 1)] for n in shape]
    flat = torch.arange(60).view(shape)
    for box in itertools.product(*dims):
        runs = byte_runs(shape, 1, box)
        assert run_count(shape, box) == len(runs), box
        got = torch.cat([torch.arange(s, s + n) for s, n in runs])
        assert torch.equal(got, flat[tuple(slice(lo, hi) for lo, hi in box)].reshape(-1)), box


def test_shard_box_is_dtensors_rule() -> None:
    """geometry.shard_box agrees with DTensor's own local shape/offset function, uneven splits included."""
    kinds = [Replicate(), Shard(0), Shard(1)]
    for shape, mesh in itertools.product([(7, 5), (4, 9), (1, 3), (0, 4)], [(2,), (3,), (2, 2), (3, 2), (2, 4)]):
        for placements in itertools.product(kinds, repeat=len(mesh)):
            for coord in itertools.product(*(range(n) for n in mesh)):
                size, offset = _compute_local_shape_and_global_offset(shape, mesh, list(coord), list(placements))
                want = tuple((o, o + n) if n else None for o, n in zip(offset, size))
                got = shard_box(shape, mesh, coord, placements)
                assert tuple(b if b[1] > b[0] else None for b in got) == want, (shape, mesh, placements, coord)


def test_source_placements() -> None:
    gate = Block(start=(0, 0, 0), dims=(0, 2, 1), shape=(8, 16, 32))  # [E, I, D] in native [E, D, 2I]
    assert source_placements(gate, (8, 32, 32), [Shard(0), Shard(1)]) == [0, 2]
    assert source_placements(gate, (8, 32, 32), [Shard(2)]) is None  # the concatenation dim
    expert = Block(start=(3, 0, 0), dims=(None, 1, 0), shape=(16, 32))  # one expert, stacked
    assert source_placements(expert, (8, 32, 16), [Shard(0)]) is None
    assert source_placements(expert, (8, 32, 16), [Replicate(), Shard(1)]) == [None, 1]


def test_a_jobs_kernel_read_is_its_view(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The batched reads write a direct or fused item at the address and layout worked out
    from the fill's destination (no view made): exactly the memory of the view the other
    paths write, for whole values, EP boxes, and rows of 64 KiB or more into a destination
    with padded rows (a direct read a row) or one that starts inside its storage."""
    from safetensors.torch import save_file

    from lazysd.automodel import HFCheckpointView
    from lazysd.reader import _Job
    from lazysd.transpose import read_job

    def check(reader, entry, box, dest: torch.Tensor) -> None:  # noqa: ANN001
        for item in reader.plan(entry, box, Destination.of(dest)):
            job = _Job(item, dest)
            seen[item.method] += 1
            fd, offset, *rest = job.kernel_job(7)
            assert (fd, offset) == (7, item.source.offset + item.runs[0][0])
            if item.method == "fused":
                assert job.kernel_job(7) == read_job(7, offset, job.dest, transposed=True), entry.key
            if item.method == "direct":
                assert job.dest.is_contiguous(), entry.key
                assert rest == [job.dest.data_ptr(), job.dest.numel() * job.dest.element_size()], entry.key
                assert rest[1] == item.data_bytes
                seen["direct at an offset"] += job.dest.data_ptr() != dest.data_ptr()

    seen: Counter[str] = Counter()
    with VirtualStateDict(checkpoints["flash"], chunk_bytes=4096) as vsd:
        for key in vsd:
            entry = vsd.entry(key)
            for box in (full_box(entry.shape), EPLayout(3, 2).box(entry, 4)):
                check(vsd.reader, entry, box, torch.empty(box_shape(box), dtype=entry.dtype))
    save_file({"w": torch.randn(4, 1 << 15).to(torch.bfloat16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with HFCheckpointView(tmp_path) as hf:
        entry = hf["w"].entry
        padded = torch.empty(4, (1 << 15) + 64, dtype=torch.bfloat16)[:, : 1 << 15]
        inside = torch.empty(5, 1 << 15, dtype=torch.bfloat16)[1:]
        for dest in (padded, inside):
            check(hf.reader, entry, full_box(entry.shape), dest)
    assert seen["direct"] and seen["fused"] and seen["direct at an offset"] >= 3, seen


def test_fill_many_is_fill_for_each(checkpoints: dict[str, Path]) -> None:
    """One pipeline over many destinations: the same bytes in each, the same reads, each
    destination counted (and reported) once, as fill() one by one would."""
    layout = EPLayout(3, 2)
    with VirtualStateDict(checkpoints["flash"], threads=2, chunk_bytes=4096) as vsd:
        fills, want = [], {}
        for key in vsd:
            entry = vsd.entry(key)
            box = layout.box(entry, 4)
            want[key] = vsd.lazy(entry, box).materialize()
            fills.append((entry, box, torch.full(box_shape(box), -1, dtype=entry.dtype)))
        planned = sum(n for e, b, d in fills for _, _, n in vsd.reader.ranges(e, b, Destination.of(d)))
        seen: list[str] = []
        vsd.reader.progress = lambda stats, entry: seen.append(entry.key)
        before, tensors = vsd.bytes_read, vsd.stats.tensors
        vsd.reader.fill_many(fills)
        assert vsd.bytes_read - before == planned and vsd.stats.tensors - tensors == len(fills)
        assert sorted(seen) == sorted(want)
        for entry, _, dest in fills:
            assert torch.equal(dest, want[entry.key]), entry.key
