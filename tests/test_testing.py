"""Tests of the test-data generators: safetensors writer, Step3p5 checkpoints, reference models."""

from __future__ import annotations

import json
import math
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lazysd.testing import (
    INDEX_NAME,
    HFMoE,
    NativeMoE,
    Step3p5Model,
    Step3p5Spec,
    checkpoint_nbytes,
    config_dict,
    hf_tensor_specs,
    load_hf_tensors,
    make_checkpoint,
    native_state_dict,
    native_tensor_specs,
)
from lazysd.writer import DTYPE_TO_NAME, NAME_TO_DTYPE, SafetensorsWriter, header_bytes, save_file
from tests.support.checks import assert_bitwise_equal

# ---------------------------------------------------------------------------------------------
# writer


def test_dtype_names_round_trip() -> None:
    assert len(DTYPE_TO_NAME) == len(NAME_TO_DTYPE) == 16
    assert DTYPE_TO_NAME[torch.float8_e8m0fnu] == "F8_E8M0"
    assert all(NAME_TO_DTYPE[name] is dtype for dtype, name in DTYPE_TO_NAME.items())


def test_header_bytes_layout() -> None:
    entries = [("b", torch.float32, (3,)), ("a", torch.bfloat16, (2, 2)), ("z", torch.int8, (0,))]
    head, offsets = header_bytes(entries, {"format": "pt"})
    (n,) = struct.unpack("<Q", head[:8])
    assert n == len(head) - 8 and len(head) % 8 == 0
    header = json.loads(head[8:])
    assert list(header) == ["__metadata__", "b", "a", "z"]  # given order, not sorted
    assert header["a"] == {"dtype": "BF16", "shape": [2, 2], "data_offsets": [12, 20]}
    assert offsets == {"b": (0, 12), "a": (12, 20), "z": (20, 20)}


def test_header_bytes_rejects_duplicates_and_unknown_dtypes() -> None:
    with pytest.raises(ValueError, match="given twice"):
        header_bytes([("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(TypeError, match="no safetensors name"):
        header_bytes([("a", torch.complex64, (1,))])


def test_save_file_round_trips_bitwise(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "fp32": torch.randn(3, 4, 2, generator=g),
        "fp16": torch.randn(9, generator=g).half(),
        "fp8_e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "empty_bf16": torch.empty(0, 4, dtype=torch.bfloat16),
        "empty_fp32": torch.empty(0),
        "scalar": torch.tensor(3.5),
        "i64": torch.arange(-3, 4),
        "u8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "noncontig": torch.randn(4, 6, generator=g).t(),
        "special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-40]),
    }
    path = save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    loaded = load_file(path)
    assert_bitwise_equal(tensors, loaded)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert list(tmp_path.iterdir()) == [path]  # the temporary file is gone


def test_save_file_accepts_pairs_and_keeps_order(tmp_path: Path) -> None:
    pairs = [("z", torch.ones(2)), ("a", torch.zeros(3))]
    path = save_file(iter(pairs), tmp_path / "p.safetensors")
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert list(json.loads(path.read_bytes()[8 : 8 + n])) == ["z", "a"]
    assert_bitwise_equal(dict(pairs), load_file(path))


def test_writer_fills_one_tensor_in_parts(tmp_path: Path) -> None:
    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    path = tmp_path / "parts.safetensors"
    with SafetensorsWriter(path, [("w", torch.float32, (6, 4))]) as w:
        w.write("w", full[4:], byte_offset=4 * 4 * 4)  # out of order on purpose
        w.write("w", full[:4])
    assert torch.equal(load_file(path)["w"], full)


def test_writer_checks_dtype_shape_and_range(tmp_path: Path) -> None:
    with SafetensorsWriter(tmp_path / "c.safetensors", [("w", torch.bfloat16, (2, 3))], sparse=True) as w:
        with pytest.raises(TypeError, match="expects dtype torch.bfloat16, got torch.float32"):
            w.write("w", torch.zeros(2, 3))
        with pytest.raises(ValueError, match="expects shape"):
            w.write("w", torch.zeros(3, 2, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="do not fit"):
            w.write("w", torch.zeros(2, 3, dtype=torch.bfloat16), byte_offset=2)
        with pytest.raises(KeyError, match="'v'"):
            w.write("v", torch.zeros(1))


def test_writer_commit_requires_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    w = SafetensorsWriter(path, [("a", torch.float32, (4,)), ("b", torch.float32, (2,))])
    w.write("a", torch.zeros(2))
    w.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match=r"1 key\(s\) not fully written, e.g. \['a'\]"):
        w.commit()
    assert list(tmp_path.iterdir()) == []


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "gone.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(path, [("a", torch.float32, (1000,))]) as w:
            assert w.tmp_path.exists() and w.tmp_path.name.startswith(f".gone.safetensors.tmp-{os.getpid()}-")
            w.write("a", torch.ones(1000))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="already committed or aborted"):
        w.write("a", torch.ones(1000))


def test_writer_abort_keeps_an_existing_file(tmp_path: Path) -> None:
    path = save_file({"old": torch.ones(2)}, tmp_path / "keep.safetensors")
    w = SafetensorsWriter(path, [("new", torch.float32, (2,))])
    w.abort()
    assert list(load_file(path)) == ["old"]
    assert list(tmp_path.iterdir()) == [path]


def test_sparse_writer_costs_no_disk(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    with SafetensorsWriter(path, [("w", torch.bfloat16, (1 << 20, 4096))], sparse=True):
        pass
    st = path.stat()
    assert st.st_size > 8 * 2**30
    assert st.st_blocks * 512 < 1 << 20
    with safe_open(path, "pt") as f:
        assert f.get_slice("w").get_shape() == [1 << 20, 4096]


# ---------------------------------------------------------------------------------------------
# Step3p5 checkpoints


def _expected_hf_shapes(spec: Step3p5Spec) -> dict[str, tuple[int, ...]]:
    """The Step3p5 release's HF key list, spelled out independently of the generator."""
    D, hd, E, I, S = (
        spec.hidden_size,
        spec.head_dim,
        spec.moe_num_experts,
        spec.moe_intermediate_size,
        spec.share_expert_dim,
    )
    kv, V, F = spec.num_attention_groups, spec.vocab_size, spec.intermediate_size
    out = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    for L in range(spec.num_hidden_layers + spec.num_nextn_predict_layers):
        p = f"model.layers.{L}."
        nh = spec.num_attention_heads if L % 4 == 0 else spec.sliding_num_attention_heads
        out |= {
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (nh * hd, D),
            p + "self_attn.k_proj.weight": (kv * hd, D),
            p + "self_attn.v_proj.weight": (kv * hd, D),
            p + "self_attn.o_proj.weight": (D, nh * hd),
            p + "self_attn.g_proj.weight": (nh, D),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
        }
        if spec.first_dense_layers <= L < spec.num_hidden_layers:
            out |= {
                p + "moe.gate.weight": (E, D),
                p + "moe.router_bias": (E,),
                p + "moe.gate_proj.weight": (E, I, D),
                p + "moe.up_proj.weight": (E, I, D),
                p + "moe.down_proj.weight": (E, D, I),
                p + "share_expert.gate_proj.weight": (S, D),
                p + "share_expert.up_proj.weight": (S, D),
                p + "share_expert.down_proj.weight": (D, S),
            }
        else:
            out |= {
                p + "mlp.gate_proj.weight": (F, D),
                p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F),
            }
        if L >= spec.num_hidden_layers:
            out |= {
                p + "enorm.weight": (D,),
                p + "hnorm.weight": (D,),
                p + "eh_proj.weight": (D, 2 * D),
                p + "transformer.shared_head.norm.weight": (D,),
                p + "transformer.shared_head.output.weight": (V, D),
            }
    return out


@pytest.mark.parametrize("spec", [Step3p5Spec.tiny(), Step3p5Spec.flash()], ids=["tiny", "flash"])
def test_hf_tensor_specs_match_formats(spec: Step3p5Spec) -> None:
    specs = hf_tensor_specs(spec)
    keys = [k for k, _, _ in specs]
    assert len(keys) == len(set(keys))
    assert {k: s for k, _, s in specs} == _expected_hf_shapes(spec)
    for key, dtype, _ in specs:
        assert dtype == (torch.float32 if key.endswith("router_bias") else torch.bfloat16), key
    assert keys[0] == "model.embed_tokens.weight" and keys[-2:] == ["model.norm.weight", "lm_head.weight"]


def test_flash_spec_matches_the_release() -> None:
    spec = Step3p5Spec.flash()
    assert spec.moe_layers == tuple(range(3, 45)) and spec.mtp_layers == (45, 46, 47)
    params = sum(math.prod(s) for _, _, s in hf_tensor_specs(spec))
    assert 198e9 < params < 200e9  # "about 199 B parameters"
    experts = dict((k, s) for k, _, s in hf_tensor_specs(spec))["model.layers.3.moe.gate_proj.weight"]
    assert 2 * math.prod(experts) == 288 * 1280 * 4096 * 2  # ~3 GB per grouped expert tensor


def test_config_dict() -> None:
    cfg = config_dict(Step3p5Spec.flash())
    assert cfg["model_type"] == "step3p5" and cfg["architectures"] == ["Step3p5ForCausalLM"]
    assert cfg["moe_layers_enum"] == ",".join(str(L) for L in range(3, 45))
    assert cfg["attention_other_setting"]["num_attention_heads"] == 96
    assert "num_key_value_heads" not in cfg
    expected = {
        "num_hidden_layers": 45,
        "num_nextn_predict_layers": 3,
        "moe_num_experts": 288,
        "moe_top_k": 8,
        "moe_intermediate_size": 1280,
        "share_expert_dim": 1280,
        "hidden_size": 4096,
        "intermediate_size": 11264,
        "num_attention_heads": 64,
        "num_attention_groups": 8,
        "head_dim": 128,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["layer_types"][:5] == ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]
    assert len(cfg["layer_types"]) == 48
    json.dumps(cfg)  # serialisable as is


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="MTP layers are always dense"):
        Step3p5Spec(moe_layers=(4,))
    with pytest.raises(ValueError, match="moe_top_k"):
        Step3p5Spec(moe_top_k=9)
    assert Step3p5Spec(first_dense_layers=2).moe_layers == (2, 3)


@pytest.mark.parametrize("total", [10**9, 2 * 10**9, 3 * 10**9])
def test_sized_spec_hits_its_size(total: int) -> None:
    spec = Step3p5Spec.sized(total)
    assert abs(checkpoint_nbytes(spec) / total - 1) < 0.1
    biggest = max(d.itemsize * math.prod(s) for _, d, s in hf_tensor_specs(spec))
    assert biggest <= 256 * 2**20


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "glm4_moe", "mixtral"])
@pytest.mark.parametrize("total", [10**9, 3 * 10**9])
def test_sized_family_spec_hits_its_size_with_per_expert_tensors(family: str, total: int) -> None:
    from lazysd.testing.families import FamilySpec
    from lazysd.testing.families import hf_tensor_specs as family_specs

    spec = FamilySpec.sized(family, total)
    specs = family_specs(spec)
    layers = spec.num_hidden_layers + spec.has_mtp
    assert abs(sum(d.itemsize * math.prod(s) for _, d, s in specs) / total - 1) < 0.2
    # Every expert of every layer is a tensor of its own (gate, up, down): the release layout.
    assert sum(".experts." in k for k, _, _ in specs) == 3 * spec.num_experts * layers


def test_sized_family_spec_takes_a_releases_layer_sizes() -> None:
    """Qwen3-30B-A3B's layers (hidden 2048, 128 experts of width 768): 1.2 GB each."""
    from lazysd.testing.families import FamilySpec
    from lazysd.testing.families import hf_tensor_specs as family_specs

    spec = FamilySpec.sized("qwen3_moe", 4 * 10**9, hidden_size=2048, num_experts=128, width=768)
    dims = (spec.num_hidden_layers, spec.hidden_size, spec.num_experts, spec.moe_intermediate_size)
    assert dims == (3, 2048, 128, 768)
    down = [s for k, _, s in family_specs(spec) if k.endswith("layers.0.mlp.experts.0.down_proj.weight")]
    assert down == [(2048, 768)]


def test_sized_family_spec_refuses_step3p7() -> None:
    from lazysd.testing.families import FamilySpec

    with pytest.raises(ValueError, match="Step3p5Spec.sized"):
        FamilySpec.sized("step3p7", 10**9)


def _shard_of(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_NAME).read_text())["weight_map"]


@pytest.mark.parametrize("layout", ["single", "sharded", "split"])
def test_tiny_checkpoint_layouts(tmp_path: Path, layout: str) -> None:
    spec = Step3p5Spec.tiny()
    path = make_checkpoint(tmp_path / layout, spec, layout=layout)  # type: ignore[arg-type]
    assert json.loads((path / "config.json").read_text()) == config_dict(spec)
    tensors = load_hf_tensors(path)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()} == {
        k: (d, s) for k, d, s in hf_tensor_specs(spec)
    }
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if layout == "single":
        assert files == ["model.safetensors"] and not (path / INDEX_NAME).exists()
        return
    index = json.loads((path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == checkpoint_nbytes(spec)
    assert sorted(set(index["weight_map"].values())) == files
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in files:  # every file holds exactly the keys the index gives it
        with safe_open(path / name, "pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == name}


def test_split_layout_separates_gate_up_down(tmp_path: Path) -> None:
    spec = Step3p5Spec.tiny()
    shard = _shard_of(make_checkpoint(tmp_path, spec, layout="split"))
    for L in spec.moe_layers or ():
        p = f"model.layers.{L}.moe."
        files = {shard[p + f"{name}_proj.weight"] for name in ("gate", "up", "down")}
        assert len(files) == 3, L


def test_values_do_not_depend_on_layout(tmp_path: Path) -> None:
    spec = Step3p5Spec.tiny()
    single = load_hf_tensors(make_checkpoint(tmp_path / "a", spec, layout="single", seed=3))
    split = load_hf_tensors(make_checkpoint(tmp_path / "b", spec, layout="split", seed=3))
    other = load_hf_tensors(make_checkpoint(tmp_path / "c", spec, layout="single", seed=4))
    assert_bitwise_equal(single, split)
    assert not torch.equal(single["lm_head.weight"], other["lm_head.weight"])
    # Values are small, finite and vary; the fp32 router bias stays tiny.
    w = single["model.layers.1.moe.gate_proj.weight"].float()
    assert torch.isfinite(w).all() and 0.0 < w.abs().max() < 0.07 and w.unique().numel() > 100
    assert single["model.layers.1.moe.router_bias"].abs().max() < 0.01


def test_chunked_generation_matches_for_big_tensors(tmp_path: Path) -> None:
    # Tensors bigger than one generation chunk are written in row slices via byte_offset.
    spec = Step3p5Spec.tiny(vocab_size=600_000)  # lm_head 19.2 M elements > 16 M chunk
    tensors = load_hf_tensors(make_checkpoint(tmp_path, spec, layout="single"))
    head = tensors["lm_head.weight"].float()
    assert torch.isfinite(head).all() and (head != 0).all()


def test_make_checkpoint_refuses_a_used_directory(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, Step3p5Spec.tiny(), layout="single")
    with pytest.raises(FileExistsError, match="already holds safetensors weights"):
        make_checkpoint(tmp_path, Step3p5Spec.tiny())


def test_sparse_flash_checkpoint_is_fast_and_free(tmp_path: Path) -> None:
    spec = Step3p5Spec.flash()
    start = time.perf_counter()
    path = make_checkpoint(tmp_path, spec, layout="split", sparse=True)
    assert time.perf_counter() - start < 5.0
    files = list(path.glob("*.safetensors"))
    logical = sum(f.stat().st_size for f in files)
    on_disk = sum(f.stat().st_blocks for f in files) * 512
    assert logical > 390e9 and on_disk < 64 * 2**20
    shard = _shard_of(path)
    assert set(shard) == {k for k, _, _ in hf_tensor_specs(spec)}
    key = "model.layers.44.moe.down_proj.weight"
    with safe_open(path / shard[key], "pt") as f:
        assert f.get_slice(key).get_shape() == [288, 4096, 1280]
        assert f.get_slice(key).get_dtype() == "BF16"


# ---------------------------------------------------------------------------------------------
# reference models


def _hf_main(spec: Step3p5Spec) -> set[str]:
    return {k for k, _, _ in hf_tensor_specs(spec, mtp=False)}


def test_hf_model_keys_and_strict_load(tmp_path: Path) -> None:
    spec = Step3p5Spec.tiny()
    model = Step3p5Model(spec, layout="hf")
    assert set(model.state_dict()) == _hf_main(spec)
    assert len(model.state_dict()) == len(_hf_main(spec))
    tensors = load_hf_tensors(make_checkpoint(tmp_path, spec))
    main = {k: v for k, v in tensors.items() if not any(k.startswith(f"model.layers.{L}.") for L in spec.mtp_layers)}
    model.load_state_dict(main, strict=True)
    for key, t in model.state_dict().items():
        assert torch.equal(t, main[key].to(t.dtype)), key
    assert model.state_dict()["model.layers.1.moe.router_bias"].dtype == torch.float32
    logits = model(torch.randint(0, spec.vocab_size, (2, 7)))
    assert logits.shape == (2, 7, spec.vocab_size) and torch.isfinite(logits).all()


def test_native_model_keys() -> None:
    spec = Step3p5Spec.tiny()
    model = Step3p5Model(spec, layout="native")
    sd = model.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == {
        k: (torch.float32, s) for k, _, s in native_tensor_specs(spec)
    }
    hf, native = _hf_main(spec), set(sd)
    moe = [f"model.layers.{L}.moe." for L in spec.moe_layers or ()]
    assert native - hf == {
        p + s for p in moe for s in ("experts.gate_and_up_projs", "experts.down_projs", "gate.e_score_correction_bias")
    }
    assert hf - native == {
        p + s for p in moe for s in ("gate_proj.weight", "up_proj.weight", "down_proj.weight", "router_bias")
    }
    bias = "model.layers.1.moe.gate.e_score_correction_bias"
    assert bias in dict(model.named_buffers()) and bias not in dict(model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert sd["model.layers.1.moe.experts.gate_and_up_projs"].shape == (8, 32, 32)


def test_models_on_meta_device() -> None:
    spec = Step3p5Spec.flash()
    for layout in ("hf", "native"):
        model = Step3p5Model(spec, layout=layout, dtype=torch.bfloat16, device="meta")  # type: ignore[arg-type]
        sd = model.state_dict()
        assert all(t.is_meta for t in sd.values())
        expected = hf_tensor_specs(spec, mtp=False) if layout == "hf" else native_tensor_specs(spec)
        assert {k: (t.dtype, tuple(t.shape)) for k, t in sd.items()} == {k: (d, s) for k, d, s in expected}


def _native_from_hf(hf: HFMoE, native: NativeMoE) -> None:
    """The adapter's formula (lazysd.adapters.step3p5): native = cat([gate.T, up.T], -1), down.T; router unchanged."""
    gate, up, down = hf.gate_proj.weight, hf.up_proj.weight, hf.down_proj.weight
    native.load_state_dict(
        {
            "gate.weight": hf.gate.weight,
            "gate.e_score_correction_bias": hf.router_bias,
            "experts.gate_and_up_projs": torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=-1),
            "experts.down_projs": down.transpose(1, 2),
        },
        strict=True,
    )


def test_hf_and_native_moe_agree() -> None:
    spec = Step3p5Spec.tiny()
    torch.manual_seed(0)
    hf, native = HFMoE(spec), NativeMoE(spec)
    with torch.no_grad():
        hf.gate.weight.normal_(0, 1.0)  # a decisive router, so tokens spread over experts
        hf.router_bias.normal_(0, 0.1)
    _native_from_hf(hf, native)
    x = torch.randn(3, 11, spec.hidden_size)
    weights, ids = hf.routing(x.reshape(-1, spec.hidden_size))
    assert ids.unique().numel() >= spec.moe_num_experts // 2  # routing really differs per token
    assert len({tuple(sorted(r)) for r in ids.tolist()}) > 5
    assert torch.allclose(weights.sum(-1), torch.ones(33))
    out_hf, out_native = hf(x), native(x)
    assert out_hf.abs().max() > 0
    torch.testing.assert_close(out_native, out_hf, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(native.routing(x.reshape(-1, spec.hidden_size))[1], ids)


def test_router_bias_changes_choice_not_weights() -> None:
    spec = Step3p5Spec.tiny()
    torch.manual_seed(1)
    moe = HFMoE(spec)
    x = torch.randn(5, spec.hidden_size)
    with torch.no_grad():
        moe.router_bias.zero_()
        moe.router_bias[3] = 10.0  # forces expert 3 into every token's top-k
    weights, ids = moe.routing(x)
    assert (ids == 3).any(-1).all()
    scores = torch.sigmoid(x @ moe.gate.weight.T)
    expected = scores.gather(-1, ids)
    torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True))


def test_whole_models_agree_across_layouts(tmp_path: Path) -> None:
    spec = Step3p5Spec.tiny()
    tensors = load_hf_tensors(make_checkpoint(tmp_path, spec, layout="single"))
    hf = Step3p5Model(spec, layout="hf")
    hf.load_state_dict({k: v for k, v in tensors.items() if k in _hf_main(spec)}, strict=True)
    native = Step3p5Model(spec, layout="native")
    native.load_state_dict(native_state_dict(hf.state_dict(), spec.num_hidden_layers), strict=True)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(native(ids), hf(ids), rtol=1e-5, atol=1e-6)
