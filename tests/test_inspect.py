"""Metadata views: reprs, select/summarize, explain(), dry-run plans vs bytes really read, CLI, plots."""

from __future__ import annotations

import io
import itertools
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from lazysd import MissingKeyError, PlacementError, VirtualStateDict
from lazysd.cli import main
from lazysd.dryrun import EPLayout
from lazysd.geometry import byte_runs, chunk_range, run_count
from lazysd.inspect import layer_of, summary_html
from lazysd.testing import Step3p5Spec, load_hf_tensors, make_checkpoint

GATE_UP = "model.layers.1.moe.experts.gate_and_up_projs"
DOWN = "model.layers.1.moe.experts.down_projs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "ck", Step3p5Spec.tiny())


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gate, up and down of each MoE layer in three different files."""
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "split", Step3p5Spec.tiny(), layout="split")


@pytest.fixture(scope="module")
def flash(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Step-3.5-Flash key space (headers only: file holes, no disk)."""
    return make_checkpoint(tmp_path_factory.mktemp("inspect") / "flash", Step3p5Spec.flash(), sparse=True)


REPR = """\
VirtualStateDict(family='step3p5', path='PATH')
  63 native keys from 83 HF tensors in 5 file(s)
  68,920 parameters, 134.7 KiB (bfloat16 99.9%, float32 0.1%)
  17 HF tensors not exposed (e.g. MTP layers; include_mtp=True shows them)
  lm_head.weight                                  [64, 32]           bfloat16     4.0 KiB  <- (same key)
  model.embed_tokens.weight                       [64, 32]           bfloat16     4.0 KiB  <- (same key)
  model.layers.0.input_layernorm.weight           [32]               bfloat16        64 B  <- (same key)
  model.layers.0.mlp.down_proj.weight             [32, 64]           bfloat16     4.0 KiB  <- (same key)
  model.layers.0.mlp.gate_proj.weight             [64, 32]           bfloat16     4.0 KiB  <- (same key)
  model.layers.0.mlp.up_proj.weight               [64, 32]           bfloat16     4.0 KiB  <- (same key)
  model.layers.0.post_attention_layernorm.weight  [32]               bfloat16        64 B  <- (same key)
  model.layers.0.self_attn.g_proj.weight          [4, 32]            bfloat16       256 B  <- (same key)
  ... 55 more"""

HTML = (
    "<div class='lazysd-vsd'><b>VirtualStateDict</b> <code>step3p5</code> &middot; <code>PATH</code>"
    "<br>63 native keys from 83 HF tensors in 5 file(s)<br>68,920 parameters, 134.7 KiB (bfloat16 99.9%, float32 0.1%)"
    "<br>17 HF tensors not exposed (e.g. MTP layers; include_mtp=True shows them)"
    "<details><summary>by module kind</summary><table><thead><tr><th>kind</th><th>keys</th><th>parameters</th>"
    "<th>bytes</th><th>share</th></tr></thead><tbody>"
    "<tr><td>embedding</td><td>1</td><td>2,048</td><td>4.0 KiB</td><td>3.0%</td></tr>"
    "<tr><td>attention</td><td>28</td><td>16,128</td><td>31.5 KiB</td><td>23.4%</td></tr>"
    "<tr><td>norm</td><td>9</td><td>288</td><td>576 B</td><td>0.4%</td></tr>"
    "<tr><td>mlp</td><td>3</td><td>6,144</td><td>12.0 KiB</td><td>8.9%</td></tr>"
    "<tr><td>router</td><td>6</td><td>792</td><td>1.6 KiB</td><td>1.2%</td></tr>"
    "<tr><td>experts</td><td>6</td><td>36,864</td><td>72.0 KiB</td><td>53.5%</td></tr>"
    "<tr><td>shared_expert</td><td>9</td><td>4,608</td><td>9.0 KiB</td><td>6.7%</td></tr>"
    "<tr><td>head</td><td>1</td><td>2,048</td><td>4.0 KiB</td><td>3.0%</td></tr></tbody></table></details>"
    "<table><thead><tr><th>key</th><th>shape</th><th>dtype</th><th>bytes</th><th>HF sources</th></tr></thead><tbody>"
    "<tr><td><code>lm_head.weight</code></td><td>[64, 32]</td><td>bfloat16</td><td style='text-align:right'>4.0 KiB</td>"
    "<td><code>(same key)</code></td></tr>"
    "<tr><td><code>model.embed_tokens.weight</code></td><td>[64, 32]</td><td>bfloat16</td><td style='text-align:right'>4.0 KiB</td>"
    "<td><code>(same key)</code></td></tr><tr><td colspan='5'>... 61 more</td></tr></tbody></table></div>"
)


# ---- reprs --------------------------------------------------------------------------------
def test_repr_snapshot(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        assert repr(vsd).replace(str(tiny), "PATH") == REPR
        assert vsd.bytes_read == 0


def test_html_snapshot(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        assert summary_html(vsd, limit=2).replace(str(tiny), "PATH") == HTML
        html = vsd._repr_html_()
        assert html.count("<tr><td><code>") == 20 and "... 43 more" in html
        assert vsd.bytes_read == 0


def test_flash_key_space_reprs_stay_small_and_fast(flash: Path) -> None:
    with VirtualStateDict(flash) as vsd:
        assert len(vsd) == 711
        t0 = time.perf_counter()
        html = vsd._repr_html_()
        text = repr(vsd)
        elapsed = time.perf_counter() - t0
        assert len(html) < 20_000, len(html)
        assert len(text.splitlines()) == 13 and text.endswith("... 703 more")
        assert "196,956,130,368 parameters, 366.9 GiB" in text
        assert elapsed < 1.0, elapsed
        assert vsd.bytes_read == 0


def test_lazy_value_repr_reads_nothing(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        assert repr(vsd[DOWN]) == f"LazyTensor(shape=[8, 16, 32], dtype=torch.bfloat16, key={DOWN!r})"
        assert vsd.bytes_read == 0


# ---- select / summarize -------------------------------------------------------------------
def test_layer_labels() -> None:
    assert [layer_of(k) for k in ("model.layers.12.mlp.up_proj.weight", "mtp.layers.0.enorm.weight", "model.norm.weight")] == [
        "12",
        "mtp.0",
        "-",
    ]


def test_select_by_glob_regex_layer_kind(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        assert list(vsd.select("*.experts.*", layer=1)) == [DOWN, GATE_UP]
        assert list(vsd.select(regex=r"moe\.gate\.", layer=[2, "3"])) == [
            "model.layers.2.moe.gate.e_score_correction_bias",
            "model.layers.2.moe.gate.weight",
            "model.layers.3.moe.gate.e_score_correction_bias",
            "model.layers.3.moe.gate.weight",
        ]
        assert list(vsd.select(layer="-")) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
        assert len(vsd.select(kind=("experts", "router"))) == 12
        sel = vsd.select(kind="experts")
        assert sel.nbytes == 72 * 1024 and torch.equal(sel[DOWN], vsd[DOWN])
        with pytest.raises(MissingKeyError, match=r"'lm_head.weight' is not in this selection of 6 keys"):
            sel["lm_head.weight"]
        with pytest.raises(ValueError, match=r"unknown module kind\(s\) \['expert'\]"):
            vsd.select(kind="expert")


def test_summarize_by_kind_and_layer(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        by_kind = vsd.summarize()
        assert [(r.group[0], r.keys) for r in by_kind.rows] == [
            ("embedding", 1), ("attention", 28), ("norm", 9), ("mlp", 3),
            ("router", 6), ("experts", 6), ("shared_expert", 9), ("head", 1),
        ]  # fmt: skip
        total = sum(e.nbytes for e in vsd.plan.entries.values())
        assert by_kind.nbytes == total == vsd.summarize(by="layer").nbytes == vsd.summarize(by=("layer", "kind")).nbytes
        assert str(by_kind).splitlines()[0] == "kind           keys  parameters     bytes  share"
        assert vsd.summarize(by=("layer", "kind")).as_dict()[("1", "experts")] == 24 * 1024
        with pytest.raises(ValueError, match="by must be 'layer', 'kind'"):
            vsd.summarize(by="file")


# ---- explain ------------------------------------------------------------------------------
def test_explain_sources_and_rank_byte_ranges(split: Path) -> None:
    hf = load_hf_tensors(split)
    with VirtualStateDict(split) as vsd:
        ex = vsd.explain(GATE_UP, ep=4)
        gate, up = (vsd.checkpoint.tensors[f"model.layers.1.moe.{p}_proj.weight"] for p in ("gate", "up"))
        assert gate.file != up.file
        assert (ex.kind, ex.shape, ex.dtype, ex.transform) == ("experts", (8, 32, 32), torch.bfloat16, "permute(0, 2, 1), cat 2 parts on dim 2")
        assert [(s.hf_key, s.file, s.start, s.end, s.native_block) for s in ex.sources] == [
            (gate.key, gate.file, gate.offset, gate.offset + 8192, ((0, 8), (0, 32), (0, 16))),
            (up.key, up.file, up.offset, up.offset + 8192, ((0, 8), (0, 32), (16, 32))),
        ]
        assert [r.box for r in ex.ranks] == [((2 * r, 2 * r + 2), (0, 32), (0, 32)) for r in range(4)]
        for r in ex.ranks:
            assert r.nbytes == 4096 and r.runs == 2
            for read, info in zip(r.reads, (gate, up)):
                (start, end), = read.ranges()
                assert (start, end) == (info.offset + r.rank * 2048, info.offset + (r.rank + 1) * 2048)
                with open(info.file, "rb") as f:  # the bytes named are that rank's experts
                    f.seek(start)
                    data = torch.frombuffer(bytearray(f.read(end - start)), dtype=torch.bfloat16)
                assert torch.equal(data, hf[info.key][2 * r.rank : 2 * r.rank + 2].reshape(-1))
        text = str(ex)
        assert "layout: ep=4 (experts Shard(0): 8 experts, 2 per rank; other tensors replicated)" in text
        assert "    rank 3: box [6:8, 0:32, 0:32], 4.0 KiB (4,096 B) in 2 range(s)" in text
        assert ex._repr_html_().startswith("<pre class='lazysd-explain'>")

        router = str(vsd.explain("model.layers.1.moe.gate.e_score_correction_bias", ep=4))
        assert "  transform: unchanged" in router and "<- " not in router
        assert "model.layers.1.moe.router_bias  [8] float32" in router
        assert "layout: ep=4 (router tensor: replicated, every rank reads it whole)" in router
        assert "    ranks 0-3: box [0:8], 32 B in 1 range(s)" in router
        assert vsd.explain(DOWN).ranks == ()
        assert vsd.bytes_read == 0
        with pytest.raises(MissingKeyError, match="no native key 'nope'"):
            vsd.explain("nope")


def test_chunk_range_follows_torch_chunk() -> None:
    for n, parts in itertools.product(range(0, 12), range(1, 7)):
        sizes = [len(c) for c in torch.arange(n).chunk(parts)] if n else []
        sizes += [0] * (parts - len(sizes))
        assert [hi - lo for lo, hi in (chunk_range(n, parts, i) for i in range(parts))] == sizes


def test_run_count_matches_runs() -> None:
    shape = (3, 4, 5)
    dims = [[(lo, hi) for lo in range(n) for hi in range(lo + 1, n + 1)] for n in shape]
    for box in itertools.product(*dims):
        assert run_count(shape, box) == len(byte_runs(shape, 2, box)), box


# ---- dry-run plans ------------------------------------------------------------------------
@pytest.mark.parametrize(("ep", "ep_shard", "fsdp"), [(1, 1, False), (4, 1, False), (3, 1, False), (5, 1, False), (2, 2, False), (3, 2, True)])
def test_plan_equals_bytes_read(split: Path, ep: int, ep_shard: int, fsdp: bool) -> None:
    """Each rank's planned bytes and ranges are what materializing its boxes reads; boxes tile each tensor."""
    with VirtualStateDict(split, threads=0) as vsd:
        plan = vsd.rank_plan(ep, ep_shard=ep_shard, fsdp=fsdp)
        assert vsd.bytes_read == 0  # planned and validated from headers
        assert len(plan.ranks) == ep * ep_shard
        covered = {k: torch.zeros(e.shape, dtype=torch.int32) for k, e in vsd.plan.entries.items()}
        full = {k: v.materialize() for k, v in vsd.items()}
        for r in plan.ranks:
            nbytes = calls = 0
            for key, box in plan.boxes(r.rank).items():
                before = (vsd.bytes_read, vsd.checkpoint.read_calls)
                part = vsd.lazy(vsd.entry(key), box).materialize()
                nbytes += vsd.bytes_read - before[0]
                calls += vsd.checkpoint.read_calls - before[1]
                region = tuple(slice(lo, hi) for lo, hi in box)
                assert torch.equal(part, full[key][region])
                covered[key][region] += 1
            assert nbytes == r.nbytes
            assert calls == r.runs  # tiny tensors: one read call per planned range
            assert sum(r.by_kind.values()) == sum(r.by_layer.values()) == r.nbytes
        for key, e in vsd.plan.entries.items():
            sharded = e.kind == "experts" or (fsdp and e.shape)
            assert bool((covered[key] == (1 if sharded else ep * ep_shard)).all()), key
        assert plan.total_bytes == sum(r.nbytes for r in plan.ranks)
        assert plan.checkpoint_bytes == sum(i.nbytes for k, i in vsd.checkpoint.tensors.items() if k not in vsd.plan.ignored)


def test_plan_numbers_uneven_and_2d(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        replicated = sum(e.nbytes for e in vsd.plan.entries.values() if e.kind != "experts")
        plan = vsd.rank_plan(3)
        assert [r.experts for r in plan.ranks] == [(0, 3), (3, 6), (6, 8)]
        per_expert = 3 * (24 * 1024) // 8  # 3 MoE layers, 24 KiB of experts per layer
        assert [r.nbytes for r in plan.ranks] == [replicated + 3 * per_expert, replicated + 3 * per_expert, replicated + 2 * per_expert]
        assert plan.imbalance == pytest.approx(max(r.nbytes for r in plan.ranks) * 3 / plan.total_bytes)
        assert vsd.rank_plan(5).ranks[4].experts == (8, 8) and vsd.rank_plan(5).ranks[4].by_kind["experts"] == 0
        two_d = vsd.rank_plan(2, ep_shard=2)
        assert [(r.ep_rank, r.ep_shard_rank) for r in two_d.ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        assert two_d.boxes(2)[GATE_UP] == ((0, 4), (16, 32), (0, 32))
        assert two_d.boxes(2)[DOWN] == ((0, 4), (8, 16), (0, 32))
        assert two_d.layer_rows()[1] == ("0", 18848, 18848, 4 * 18848)
        assert vsd.bytes_read == 0
        for bad in (0, -1):
            with pytest.raises(PlacementError, match=f"ep must be a positive integer, got {bad}"):
                vsd.rank_plan(bad)
        with pytest.raises(PlacementError, match="ep_shard must be a positive integer, got 0"):
            vsd.explain(DOWN, ep=2, ep_shard=0)


def test_layout_box_fsdp_shards_dense_tensors(tiny: Path) -> None:
    with VirtualStateDict(tiny) as vsd:
        layout = EPLayout(2, 1, fsdp=True)
        assert layout.box(vsd.entry("lm_head.weight"), 1) == ((32, 64), (0, 32))
        assert layout.box(vsd.entry("model.norm.weight"), 0) == ((0, 16),)


def test_flash_plan_is_fast_and_reads_nothing(flash: Path) -> None:
    with VirtualStateDict(flash) as vsd:
        t0 = time.perf_counter()
        plan = vsd.rank_plan(8)
        assert time.perf_counter() - t0 < 5
        experts = 42 * 3 * 288 * 1280 * 4096 * 2  # 42 MoE layers, gate+up+down
        assert plan.checkpoint_bytes == 393_912_284_928
        assert {r.nbytes for r in plan.ranks} == {plan.checkpoint_bytes - experts + experts // 8}
        assert plan.imbalance == 1.0 and vsd.bytes_read == 0


# ---- CLI ----------------------------------------------------------------------------------
CLI_PLAN = """\
dry-run load plan: ep=4 (experts Shard(0): 8 experts, 2 per rank; other tensors replicated)
  63 keys checked from headers; 134.7 KiB (137,888 B) to read once
  rank  experts              bytes       human   ranges  experts share
     0  0:2                 82,592    80.7 KiB       66          22.3%
     1  2:4                 82,592    80.7 KiB       66          22.3%
     2  4:6                 82,592    80.7 KiB       66          22.3%
     3  6:8                 82,592    80.7 KiB       66          22.3%
  all ranks: 322.6 KiB (2.40x the checkpoint); imbalance max/mean 1.000
  layer  per rank min per rank max    all ranks
  -           8.1 KiB      8.1 KiB     32.2 KiB
  0          18.4 KiB     18.4 KiB     73.6 KiB
  1          18.1 KiB     18.1 KiB     72.2 KiB
  2          18.1 KiB     18.1 KiB     72.2 KiB
  3          18.1 KiB     18.1 KiB     72.2 KiB

tensor bytes read: 0
"""


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(list(argv))
    return rc, out.getvalue()


def test_cli_inspect_ep(tiny: Path) -> None:
    rc, out = _cli("inspect", str(tiny), "--ep", "4", "--limit", "2")
    assert rc == 0
    head, plan = out.split("\n\ndry-run", 1)
    assert head.endswith("model.embed_tokens.weight  [64, 32]           bfloat16     4.0 KiB  <- (same key)\n... 61 more")
    assert "dry-run" + plan == CLI_PLAN


def test_cli_inspect_filters_and_summary(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _cli("inspect", str(tiny), "--match", "*moe*", "--layer", "1", "--layer", "2", "--summary")
    assert rc == 0
    assert "8 of 63 keys match --match='*moe*' --layer=['1', '2']\nkind     keys  parameters     bytes  share\nrouter      4" in out
    assert "\nlayer  keys  parameters     bytes  share\n1         4      12,552  24.5 KiB  50.0%\n" in out
    rc, out = _cli("inspect", str(tiny), "--layer", "1", "--ep", "2", "--ep-shard", "2")
    assert "dry-run load plan: ep=2 x ep_shard=2 (experts Shard(0): 8 experts, 4 per rank; Shard(1) over ep_shard=2;" in out
    assert "  16 keys checked from headers" in out
    assert main(["inspect", str(tiny), "--ep", "0"]) == 2
    assert capsys.readouterr().err == "lazysd: error: ep must be a positive integer, got 0\n"


# ---- plots --------------------------------------------------------------------------------
def test_plots(tiny: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    from lazysd.plot import plot_layer_bytes, plot_rank_bytes

    with VirtualStateDict(tiny) as vsd:
        ax = plot_layer_bytes(vsd)
        heights = sum(p.get_height() for p in ax.patches)
        assert ax.get_ylabel() == "KiB" and heights * 1024 == pytest.approx(sum(e.nbytes for e in vsd.plan.entries.values()))
        assert [t.get_text() for t in ax.get_xticklabels()] == ["-", "0", "1", "2", "3"]
        plan = vsd.rank_plan(3)
        ax = plot_rank_bytes(plan)
        assert sum(p.get_height() for p in ax.patches) * 1024 == pytest.approx(plan.total_bytes)
        assert ax.get_title() == f"bytes read per rank, ep=3 (imbalance {plan.imbalance:.3f})"
        assert vsd.bytes_read == 0
        plt.close("all")
