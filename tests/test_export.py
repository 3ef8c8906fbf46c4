"""Export: HFView and save_hf round trips, sharding, safety (single process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lazysd import ExportError, HFView, UnclaimedKeyError, VirtualStateDict, save_hf
from lazysd.export import NATIVE, parse_size, save_native
from lazysd.rules import Adapter, Part, Rule
from lazysd.testing import Step3p5Model, Step3p5Spec, load_hf_tensors, make_checkpoint
from tests.support.checks import assert_bitwise_equal

SPEC = Step3p5Spec.tiny()


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("src") / "step3p5", SPEC, layout="split")


@pytest.fixture(scope="module")
def original(src: Path) -> dict[str, torch.Tensor]:
    return load_hf_tensors(src)


def shards(out: Path) -> list[Path]:
    return sorted(out.glob("model-*.safetensors"))


def test_vsd_roundtrip_with_mtp_is_bitwise(src: Path, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    with VirtualStateDict(src, include_mtp=True) as vsd:
        out = save_hf(vsd, tmp_path / "out", max_shard_size="40KB", config=src / "config.json")
    files = shards(out)
    assert len(files) > 1
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    # The plain safetensors library reads every shard; together they are the original checkpoint.
    got: dict[str, torch.Tensor] = {}
    for f in files:
        got.update(load_file(f))
    assert_bitwise_equal(got, original)
    assert "model.layers.4.eh_proj.weight" in got  # MTP layer, numbered back from mtp.layers.0
    assert got["model.layers.1.moe.router_bias"].dtype == torch.float32
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    assert set(index["weight_map"]) == set(original)
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    # And lazysd reads it back to the same native tensors.
    with VirtualStateDict(src, include_mtp=True) as a, VirtualStateDict(out, include_mtp=True) as b:
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key].materialize(), b[key].materialize()), key


def test_model_roundtrip_is_bitwise(src: Path, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(src) as vsd:
        model.load_state_dict(vsd)
    out = save_hf(model, tmp_path / "out", adapter="step3p5")
    main = {k: v for k, v in original.items() if not k.startswith("model.layers.4.")}
    assert_bitwise_equal(load_hf_tensors(out), main)


def test_fp32_model_casts_back_but_router_bias_stays_fp32(src: Path, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = Step3p5Model(SPEC, layout="native")  # fp32 parameters, fp32 bias buffers
    with VirtualStateDict(src) as vsd:
        model.load_state_dict(vsd)
    model.model.layers[1].moe.gate.e_score_correction_bias.data = model.model.layers[1].moe.gate.e_score_correction_bias.data.double()
    out = save_hf(model.state_dict(), tmp_path / "out", adapter="step3p5", dtype=torch.bfloat16)
    got = load_hf_tensors(out)
    main = {k: v for k, v in original.items() if not k.startswith("model.layers.4.")}
    assert_bitwise_equal(got, main)  # bf16 -> fp32 -> bf16 is lossless; the pinned fp32 bias is cast back too


def test_hfview_keys_need_no_reads_and_values_read_only_their_piece(src: Path, original: dict[str, torch.Tensor]) -> None:
    with VirtualStateDict(src, include_mtp=True) as vsd:
        view = HFView(vsd)
        assert vsd.bytes_read == 0
        assert set(view) == set(original)
        assert len(view) == len(original)
        assert view.entries["model.layers.2.moe.up_proj.weight"].native_key == "model.layers.2.moe.experts.gate_and_up_projs"
        up = view["model.layers.2.moe.up_proj.weight"]
        assert up.is_contiguous()
        assert torch.equal(up, original["model.layers.2.moe.up_proj.weight"])
        assert vsd.bytes_read == up.numel() * up.element_size()  # the up half only
        assert torch.equal(view["model.layers.2.moe.router_bias"], original["model.layers.2.moe.router_bias"])
        assert "model.layers.2.moe.experts.down_projs" not in view
        with pytest.raises(KeyError, match="no HF key 'nope'"):
            view["nope"]


def test_sharding_respects_max_shard_size(src: Path, tmp_path: Path) -> None:
    with VirtualStateDict(src, include_mtp=True) as vsd:
        out = save_hf(vsd, tmp_path / "out", max_shard_size=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes: dict[str, list[int]] = {}
    for name in index["weight_map"].values():
        sizes.setdefault(name, [])
    for f in shards(out):
        tensors = load_file(f)
        nbytes = [t.numel() * t.element_size() for t in tensors.values()]
        assert sum(nbytes) <= 30_000 or len(nbytes) == 1
        assert {k for k, n in index["weight_map"].items() if n == f.name} == set(tensors)
    assert sorted(sizes) == [f.name for f in shards(out)]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(" 1.5 kb ") == 1500
    assert parse_size(123) == 123
    with pytest.raises(ExportError, match="'5 parsecs' is not a size"):
        parse_size("5 parsecs")
    with pytest.raises(ExportError, match="must be positive"):
        parse_size(0)


def test_refuses_the_source_directory(src: Path) -> None:
    before = sorted(p.name for p in src.iterdir())
    with VirtualStateDict(src, include_mtp=True) as vsd:
        with pytest.raises(ExportError, match="is the source checkpoint's directory"):
            save_hf(vsd, src, overwrite=True)
        # Lazy values carry their source too, even outside the VirtualStateDict.
        with pytest.raises(ExportError, match="is the source checkpoint's directory"):
            save_hf(dict(vsd), src, adapter="step3p5", num_layers=SPEC.num_hidden_layers, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == before


def test_existing_output_needs_overwrite(src: Path, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with VirtualStateDict(src, include_mtp=True) as vsd:
        save_hf(vsd, out, max_shard_size="40KB")
        n_before = len(shards(out))
        (out / "README.md").write_text("keep me\n")
        with pytest.raises(ExportError, match=r"exists and is not empty; pass overwrite=True"):
            save_hf(vsd, out)
        save_hf(vsd, out, overwrite=True)  # one 5GB shard replaces the small ones
    assert n_before > 1
    assert [f.name for f in shards(out)] == ["model-00001-of-00001.safetensors"]
    assert (out / "README.md").read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert_bitwise_equal(load_hf_tensors(out), original)


def test_empty_existing_directory_is_fine(src: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with VirtualStateDict(src) as vsd:
        save_hf(vsd, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_meta_tensors_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    sd = {"model.embed_tokens.weight": torch.ones(4, 2), "lm_head.weight": torch.empty(4, 2, device="meta")}
    with pytest.raises(ExportError, match=r"native key 'lm_head.weight' is on the meta device: it has a shape but no data"):
        save_hf(sd, tmp_path / "out", adapter="step3p5")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no staging directory, no lock


def test_unclaimed_and_mtp_keys_are_explained(tmp_path: Path) -> None:
    with pytest.raises(UnclaimedKeyError, match="native key 'model.rotary.inv_freq' matches no rule of the step3p5 adapter"):
        HFView({"model.rotary.inv_freq": torch.ones(2)}, adapter="step3p5")
    with pytest.raises(ExportError, match=r"'mtp.layers.0.eh_proj.weight' is an MTP layer; pass num_layers="):
        HFView({"mtp.layers.0.eh_proj.weight": torch.ones(2, 4)}, adapter="step3p5")
    view = HFView({"mtp.layers.0.eh_proj.weight": torch.ones(2, 4)}, adapter="step3p5", num_layers=45)
    assert list(view) == ["model.layers.45.eh_proj.weight"]
    with pytest.raises(ExportError, match="pass adapter="):
        HFView({"lm_head.weight": torch.ones(2)})


# A per-expert family (Qwen3-MoE-like): one HF key per expert, stacked natively.
L = "model.layers.{layer}.mlp"
PER_EXPERT = Adapter(
    "per-expert-test",
    ("per_expert_test",),
    rules=(
        Rule(
            L + ".experts.gate_and_up_projs",
            parts=(Part(L + ".experts.{expert}.gate_proj.weight", dims=(None, 1, 0)), Part(L + ".experts.{expert}.up_proj.weight", dims=(None, 1, 0))),
            cat_dim=2,
            kind="experts",
        ),
        Rule(L + ".experts.down_projs", parts=(Part(L + ".experts.{expert}.down_proj.weight", dims=(None, 1, 0)),), kind="experts"),
        Rule(L + ".gate.weight", kind="router"),
    ),
)


def per_expert_native(E: int = 4, D: int = 6, I: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.gate.weight": torch.randn(E, D, generator=g),
        "model.layers.0.mlp.experts.gate_and_up_projs": torch.randn(E, D, 2 * I, generator=g).bfloat16(),
        "model.layers.0.mlp.experts.down_projs": torch.randn(E, I, D, generator=g).bfloat16(),
    }


def test_per_expert_family_unstacks_one_key_per_expert(tmp_path: Path) -> None:
    native = per_expert_native()
    out = save_hf(native, tmp_path / "out", adapter=PER_EXPERT)
    got = load_hf_tensors(out)
    gau, down = native["model.layers.0.mlp.experts.gate_and_up_projs"], native["model.layers.0.mlp.experts.down_projs"]
    assert len(got) == 1 + 3 * 4
    for e in range(4):
        assert torch.equal(got[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], gau[e, :, :3].T)
        assert torch.equal(got[f"model.layers.0.mlp.experts.{e}.up_proj.weight"], gau[e, :, 3:].T)
        assert torch.equal(got[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], down[e].T)


def test_save_native_roundtrip(src: Path, original: dict[str, torch.Tensor], tmp_path: Path) -> None:
    with VirtualStateDict(src, include_mtp=True) as vsd:
        native = save_native(vsd, tmp_path / "native", max_shard_size="50KB", config=src / "config.json")
        want = {k: vsd[k].materialize() for k in vsd}
    assert_bitwise_equal(load_hf_tensors(native), want)
    with VirtualStateDict(native, adapter=NATIVE) as files:  # native keys, read back lazily
        assert list(files) == list(want)
        out = save_hf(files, tmp_path / "hf", adapter="step3p5", num_layers=SPEC.num_hidden_layers)
        assert_bitwise_equal(load_hf_tensors(out), original)
        with pytest.raises(ExportError, match="is the source checkpoint's directory"):
            save_hf(files, native, adapter="step3p5", num_layers=SPEC.num_hidden_layers, overwrite=True)


def test_every_family_roundtrips_bitwise(tmp_path: Path) -> None:
    from lazysd.testing import families

    for family in families.FAMILIES:
        src = families.make_family_checkpoint(tmp_path / family, families.FamilySpec.tiny(family))
        with VirtualStateDict(src, include_mtp=True) as vsd:
            out = save_hf(vsd, tmp_path / f"{family}-out", config=src / "config.json")
        assert_bitwise_equal(load_hf_tensors(out), load_hf_tensors(src))


def test_cli_convert_directions(src: Path, original: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lazysd.cli import main

    assert main(["convert", str(src), str(tmp_path / "hf"), "--max-shard-size", "40KB"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote ") and f"to {tmp_path / 'hf'}" in out
    assert "lazysd: wrote" in err and "(100.0%), 83 tensors" in err  # progress on stderr
    assert len(shards(tmp_path / "hf")) > 1
    assert_bitwise_equal(load_hf_tensors(tmp_path / "hf"), original)
    assert (tmp_path / "hf" / "config.json").read_bytes() == (src / "config.json").read_bytes()

    assert main(["convert", str(src), str(tmp_path / "native"), "--to", "native", "--quiet"]) == 0
    assert "model.layers.1.moe.experts.gate_and_up_projs" in load_hf_tensors(tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--from", "native", "--quiet"]) == 0
    assert_bitwise_equal(load_hf_tensors(tmp_path / "back"), original)
    capsys.readouterr()

    assert main(["convert", str(src), str(tmp_path / "hf"), "--quiet"]) == 2
    assert "exists and is not empty; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["convert", str(src), str(src), "--overwrite", "--quiet"]) == 2
    assert "is the source checkpoint's directory" in capsys.readouterr().err
