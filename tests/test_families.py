"""Every registered family through the one rule engine: keys, values, FP8, loading, forward, detection."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lazysd import ConfigError, ShapeMismatchError, UnknownModelError, VirtualStateDict
from lazysd.adapters import detect, known
from lazysd.checkpoint import Checkpoint
from lazysd.cli import main
from lazysd.errors import UnsupportedFormatError
from lazysd.geometry import full_box
from lazysd.plan import resolve
from lazysd.rules import Adapter, Part, Rule
from lazysd.testing import load_hf_tensors
from lazysd.testing.families import (
    FAMILIES,
    FamilySpec,
    ParamTree,
    dequantize_reference,
    eager_native,
    hf_moe,
    make_family_checkpoint,
    moe_layers,
    native_moe,
)
from lazysd.writer import save_file
from tests.support.checks import same_bits

CASES = [(f, False) for f in FAMILIES] + [("deepseek_v3", True)]
IDS = [f + ("-fp8" if fp8 else "") for f, fp8 in CASES]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("families")
    return {(f, fp8): make_family_checkpoint(root / (f + ("-fp8" if fp8 else "")), FamilySpec.tiny(f, fp8=fp8)) for f, fp8 in CASES}


@pytest.mark.parametrize(("family", "fp8"), CASES, ids=IDS)
def test_keys_shapes_values_match_eager_conversion(checkpoints: dict, family: str, fp8: bool) -> None:
    spec = FamilySpec.tiny(family, fp8=fp8)
    path = checkpoints[family, fp8]
    ref = eager_native(spec, load_hf_tensors(path))
    with VirtualStateDict(path) as vsd:
        assert vsd.adapter.name == family
        assert set(vsd) == set(ref)  # FP8 scales and MTP layers never show up as keys
        assert not any(k.endswith("_scale_inv") for k in vsd)
        for key, want in ref.items():
            got = vsd[key]
            assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype), key
            if fp8:  # both sides: fp32 product, one rounding to bf16
                torch.testing.assert_close(got.materialize(), want, rtol=0, atol=0, msg=key)
            else:
                assert same_bits(got.materialize(), want), key


def test_fp8_dequantization_matches_blockwise_reference_on_ragged_blocks(checkpoints: dict) -> None:
    path = checkpoints["deepseek_v3", True]
    hf = load_hf_tensors(path)
    w, s = hf["model.layers.1.mlp.experts.2.down_proj.weight"], hf["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (160, 80) and tuple(s.shape) == (2, 1)  # ragged: 160 = 128 + 32
    with VirtualStateDict(path, dtype=torch.float32) as vsd:
        native = vsd["model.layers.1.mlp.experts.down_projs"]
        assert native.dtype == torch.float32
        torch.testing.assert_close(native[2], dequantize_reference(w, s).T, rtol=1e-6, atol=0)
        # A box inside the second (ragged) row block reads only that block's scale.
        entry = vsd.entry("model.layers.0.self_attn.o_proj.weight")
        box = ((130, 150), (0, 16))
        before = vsd.bytes_read
        part = vsd.lazy(entry, box).materialize()
        ref = dequantize_reference(hf["model.layers.0.self_attn.o_proj.weight"], hf["model.layers.0.self_attn.o_proj.weight_scale_inv"])
        torch.testing.assert_close(part, ref[130:150, 0:16], rtol=1e-6, atol=0)
        assert vsd.bytes_read - before == 20 * 16 * 1 + 1 * 4  # fp8 rows + one fp32 scale
        # The plan's per-rank accounting counts exactly those reads, scales included.
        ranges = vsd.reader.ranges(entry, box)
        assert sum(n for _, _, n in ranges) == 20 * 16 + 4
        assert any(f.endswith(".safetensors") and n == 4 for f, _, n in ranges)
        # Experts [1, 3) of a stacked FP8 tensor: planned bytes == bytes read.
        gate_up = vsd.entry("model.layers.1.mlp.experts.gate_and_up_projs")
        box = ((1, 3), *((0, n) for n in gate_up.shape[1:]))
        before = vsd.bytes_read
        vsd.lazy(gate_up, box).materialize()
        assert vsd.bytes_read - before == sum(n for _, _, n in vsd.reader.ranges(gate_up, box)) > 0


def test_fp8_keep_exposes_fp8_and_scales_under_native_keys(checkpoints: dict) -> None:
    path = checkpoints["deepseek_v3", True]
    hf = load_hf_tensors(path)
    with VirtualStateDict(path, fp8="keep", dtype=torch.bfloat16) as vsd:
        w = vsd["model.layers.1.mlp.experts.gate_and_up_projs"]
        s = vsd["model.layers.1.mlp.experts.gate_and_up_projs_scale_inv"]
        assert (w.dtype, tuple(w.shape)) == (torch.float8_e4m3fn, (4, 160, 160))
        assert (s.dtype, tuple(s.shape)) == (torch.float32, (4, 2, 2))  # per expert [2, 1]^T, gate and up blocks side by side
        p = "model.layers.1.mlp.experts.3."
        assert same_bits(w[3], torch.cat([hf[p + "gate_proj.weight"].T, hf[p + "up_proj.weight"].T], -1))
        assert torch.equal(s[3], torch.cat([hf[p + "gate_proj.weight_scale_inv"].T, hf[p + "up_proj.weight_scale_inv"].T], -1))
        assert "model.layers.0.self_attn.o_proj.weight_scale_inv" in vsd
        assert "model.layers.0.input_layernorm.weight_scale_inv" not in vsd
    with pytest.raises(ValueError, match="fp8 must be 'dequantize' or 'keep'"):
        VirtualStateDict(path, fp8="drop")


@pytest.mark.parametrize(("family", "fp8"), CASES, ids=IDS)
def test_strict_load_into_native_module(checkpoints: dict, family: str, fp8: bool) -> None:
    spec = FamilySpec.tiny(family, fp8=fp8)
    path = checkpoints[family, fp8]
    ref = eager_native(spec, load_hf_tensors(path))
    model = ParamTree({k: (tuple(t.shape), t.dtype) for k, t in ref.items()})
    with VirtualStateDict(path) as vsd:
        result = model.load_state_dict(vsd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    sd = model.state_dict()
    assert all(same_bits(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize(("family", "fp8"), CASES, ids=IDS)
def test_hf_layer_and_native_layer_compute_the_same(checkpoints: dict, family: str, fp8: bool) -> None:
    spec = FamilySpec.tiny(family, fp8=fp8)
    path = checkpoints[family, fp8]
    hf = load_hf_tensors(path)
    hf = {k: dequantize_reference(t, hf[k + "_scale_inv"]) if k + "_scale_inv" in hf else t.float() for k, t in hf.items() if not k.endswith("_scale_inv")}
    x = torch.randn(24, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    with VirtualStateDict(path, dtype=torch.float32) as vsd:
        native = {k: vsd[k].materialize() for k in vsd if ".experts." in k or ".gate." in k or "shared" in k or "share_expert" in k}
    layers = moe_layers(spec)
    assert layers
    for layer in layers:
        want = hf_moe(spec, hf, layer, x)
        torch.testing.assert_close(native_moe(spec, native, layer, x), want, rtol=1e-5, atol=1e-6)
        assert want.abs().sum() > 0


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_expert_range_reads_only_those_experts(checkpoints: dict, family: str) -> None:
    spec = FamilySpec.tiny(family)
    path = checkpoints[family, False]
    hf = load_hf_tensors(path)
    key = "model.layers.1.mlp.experts.gate_and_up_projs"
    with VirtualStateDict(path) as vsd:
        entry = vsd.entry(key)
        box = ((2, 4), *full_box(entry.shape)[1:])  # an EP rank owning experts [2, 4)
        before = vsd.bytes_read
        got = vsd.lazy(entry, box).materialize()
        assert vsd.bytes_read - before == 2 * 2 * spec.expert_width * spec.hidden_size * 2  # 2 experts x (gate, up), bf16
    assert torch.equal(got, eager_native(spec, hf)[key][2:4])


@pytest.mark.parametrize(("family", "fp8"), CASES, ids=IDS)
def test_inspect_shows_the_detected_family(checkpoints: dict, family: str, fp8: bool, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(checkpoints[family, fp8])]) == 0
    out = capsys.readouterr().out
    assert f"family={family!r}" in out
    assert "_scale_inv" not in out


def test_mtp_layers_are_opt_in(checkpoints: dict) -> None:
    path = checkpoints["deepseek_v3", False]
    with VirtualStateDict(path, include_mtp=True) as vsd:
        assert "mtp.layers.0.eh_proj.weight" in vsd
        assert tuple(vsd["mtp.layers.0.mlp.experts.gate_and_up_projs"].shape) == (4, 32, 32)
    with VirtualStateDict(checkpoints["step3p7", False], include_mtp=True) as vsd:
        assert "model.language_model.mtp.layers.0.eh_proj.weight" in vsd
        assert "model.vision_model.transformer.resblocks.0.attn.in_proj_weight" in vsd


# ---- detection ---------------------------------------------------------------------------


def _without_model_type(src: Path, dst: Path, **config: object) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copyfile(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_detection_uses_nested_text_config_and_keys(checkpoints: dict, tmp_path: Path) -> None:
    assert detect({"model_type": "some_vlm", "text_config": {"model_type": "qwen3_moe"}}).name == "qwen3_moe"
    path = _without_model_type(checkpoints["mixtral", False], tmp_path / "m")
    with VirtualStateDict(path) as vsd:  # no model_type: the one family claiming every key
        assert vsd.adapter.name == "mixtral"
    with pytest.raises(UnknownModelError, match="adapter 'nope' is not registered"):
        VirtualStateDict(path, adapter="nope")


def test_ambiguous_checkpoint_lists_candidates(checkpoints: dict, tmp_path: Path) -> None:
    path = _without_model_type(checkpoints["qwen3_moe", False], tmp_path / "q")
    with pytest.raises(UnknownModelError, match=r"config.json: no model_type \(supported: .*\); ambiguous: the keys fit several families \(qwen3_moe, glm4_moe\)"):
        VirtualStateDict(path)
    with VirtualStateDict(path, adapter="qwen3_moe") as vsd:
        assert "model.layers.1.mlp.experts.down_projs" in vsd


def test_unknown_checkpoint_lists_families_and_unclaimed_keys(tmp_path: Path) -> None:
    save_file({"encoder.block.0.weight": torch.zeros(2), "model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UnknownModelError) as info:
        VirtualStateDict(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'config.json'}: model_type 't5' is not supported (supported: step3p5 (step3p5), ")
    assert "deepseek_v3 (deepseek_v3)" in msg and "gpt_oss (gpt_oss)" in msg and "step3p7 (step3p7)" in msg
    assert "keys no family claims:\n  encoder.block.0.weight" in msg
    assert "model.embed_tokens.weight" not in msg.split("keys no family claims:")[1]


def test_gpt_oss_mxfp4_is_refused_naming_the_keys(tmp_path: Path) -> None:
    E = 2
    save_file(
        {
            "model.layers.0.mlp.experts.gate_up_proj_blocks": torch.zeros(E, 8, 1, 16, dtype=torch.uint8),
            "model.layers.0.mlp.experts.gate_up_proj_scales": torch.zeros(E, 8, 1, dtype=torch.uint8),
        },
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "num_hidden_layers": 1}))
    with pytest.raises(UnsupportedFormatError, match=r"does not convert model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks \(model\.safetensors\).*MXFP4"):
        VirtualStateDict(tmp_path)


def test_user_declared_family_in_a_few_lines(tmp_path: Path) -> None:
    """The recipe of the lazysd.adapters docstring, for a made-up family."""
    E, D, I = 3, 4, 2
    g = torch.Generator().manual_seed(0)
    hf = {"model.embed_tokens.weight": torch.randn(5, D, generator=g)}
    for e in range(E):
        p = f"model.layers.0.moe.experts.{e}."
        hf |= {p + "w_gate.weight": torch.randn(I, D, generator=g), p + "w_up.weight": torch.randn(I, D, generator=g), p + "w_down.weight": torch.randn(D, I, generator=g)}
    save_file(hf, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mymoe", "num_hidden_layers": 1}))

    L = "model.layers.{layer}"
    my = Adapter("mymoe", ("mymoe",), rules=(
        Rule(L + ".moe.experts.gate_and_up_projs", cat_dim=2, kind="experts", parts=(
            Part(L + ".moe.experts.{expert}.w_gate.weight", dims=(None, 1, 0)),
            Part(L + ".moe.experts.{expert}.w_up.weight", dims=(None, 1, 0)))),
        Rule(L + ".moe.experts.down_projs", kind="experts", parts=(Part(L + ".moe.experts.{expert}.w_down.weight", dims=(None, 1, 0)),)),
        Rule("{name:**}"),
    ))  # fmt: skip

    with VirtualStateDict(tmp_path, adapter=my) as vsd:
        assert list(vsd) == ["model.embed_tokens.weight", "model.layers.0.moe.experts.down_projs", "model.layers.0.moe.experts.gate_and_up_projs"]
        gu = vsd["model.layers.0.moe.experts.gate_and_up_projs"].materialize()
        assert torch.equal(gu[1], torch.cat([hf["model.layers.0.moe.experts.1.w_gate.weight"].T, hf["model.layers.0.moe.experts.1.w_up.weight"].T], -1))
    with pytest.raises(UnknownModelError, match=r"model_type 'mymoe' is not supported .*keys no family claims:\n  model.layers.0.moe.experts.0.w_gate.weight"):
        VirtualStateDict(tmp_path)


@pytest.mark.parametrize("bad", [[0, 128], "128", [128], [128.0, 128]])
def test_fp8_block_size_from_config_is_validated(checkpoints: dict, tmp_path: Path, bad: object) -> None:
    src = checkpoints["deepseek_v3", True]
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = bad
    path = _without_model_type(src, tmp_path / "c", **config)
    with pytest.raises(ConfigError, match=r"config.json: quantization_config.weight_block_size must be two positive integers"):
        VirtualStateDict(path)


def test_fp8_scale_of_the_wrong_shape_is_an_error(checkpoints: dict, tmp_path: Path) -> None:
    src = checkpoints["deepseek_v3", True]
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]  # scales were written for 128 x 128
    path = _without_model_type(src, tmp_path / "c", **config)
    with pytest.raises(ShapeMismatchError, match=r"key 'model.layers.0.self_attn.q_a_proj.weight_scale_inv': scales \[1, 2\]"):
        VirtualStateDict(path)


def test_fp8_keep_scales_are_not_claimed_by_a_trailing_catch_all(tmp_path: Path) -> None:
    # The Adapter docstring: scale companions are claimed with their weight, never on their
    # own. A user adapter ending in a catch-all must not take them before the scale rules.
    path = make_family_checkpoint(tmp_path / "ckpt", FamilySpec.tiny("deepseek_v3", fp8=True))
    stock = known()["deepseek_v3"]
    catch_all = replace(stock, name="deepseek_v3_catch_all", rules=(*stock.rules, Rule("{name:**}")))
    with Checkpoint(path) as ckpt:
        want = resolve(stock, ckpt.config, ckpt.tensors, where=ckpt.path, fp8="keep")
        got = resolve(catch_all, ckpt.config, ckpt.tensors, where=ckpt.path, fp8="keep")
    assert list(got.entries) == list(want.entries)
    stacked = got.entries["model.layers.1.mlp.experts.gate_and_up_projs_scale_inv"]
    assert stacked.kind == "experts" and stacked.dtype == torch.float32
    assert stacked.shape == want.entries[stacked.key].shape
    assert all(s.info.key.endswith("_scale_inv") for s in stacked.sources)
    assert not [k for k in got.entries if ".experts.0." in k]  # no per-expert scale leaks out unstacked
