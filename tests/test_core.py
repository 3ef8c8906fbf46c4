"""The core VirtualStateDict over Step3p5 checkpoints: keys, values, laziness, errors."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from lazysd import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    LazySDError,
    LazyTensor,
    MissingKeyError,
    MissingSourceError,
    NoWeightsError,
    ShapeMismatchError,
    UnclaimedKeyError,
    UnknownModelError,
    VirtualStateDict,
)
from lazysd.cli import main as cli_main
from lazysd.testing import (
    Step3p5Model,
    Step3p5Spec,
    load_hf_tensors,
    make_checkpoint,
    native_state_dict,
    native_tensor_specs,
)
from lazysd.writer import save_file
from tests.support.pagecache import PAGE, evict, resident_map, resident_pages

SPECS = {
    "tiny": Step3p5Spec.tiny(),
    "wide": Step3p5Spec.tiny(
        moe_num_experts=12, hidden_size=48, moe_intermediate_size=24, num_hidden_layers=5, first_dense_layers=2
    ),
    "no-mtp": Step3p5Spec.tiny(num_nextn_predict_layers=0, moe_num_experts=3),
}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", SPECS["tiny"], layout="split", seed=1)


# ---- keys, values, Mapping contract -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("layout", ["single", "sharded", "split"])
def test_values_equal_eager_conversion_bitwise(tmp_path: Path, name: str, layout: str) -> None:
    spec = SPECS[name]
    path = make_checkpoint(tmp_path / "c", spec, layout=layout, seed=3)
    vsd = VirtualStateDict(path)
    expected = native_state_dict(load_hf_tensors(path), spec.num_hidden_layers)
    assert list(vsd) == sorted(
        expected, key=lambda k: [int(t) if t.isdigit() else t for t in k.replace(".", " . ").split()]
    )
    assert set(vsd) == {k for k, _, _ in native_tensor_specs(spec)}
    for key, want in expected.items():
        got = vsd[key]
        assert isinstance(got, LazyTensor)
        assert (tuple(got.shape), got.dtype) == (tuple(want.shape), want.dtype), key
        value = got.materialize()
        assert value.dtype == want.dtype and torch.equal(value, want), key


def test_native_key_names_and_shapes(tiny_ckpt: Path) -> None:
    spec = SPECS["tiny"]
    vsd = VirtualStateDict(tiny_ckpt)
    E, D, I = spec.moe_num_experts, spec.hidden_size, spec.moe_intermediate_size
    layer = spec.moe_layers[0]
    assert vsd[f"model.layers.{layer}.moe.experts.gate_and_up_projs"].shape == (E, D, 2 * I)
    assert vsd[f"model.layers.{layer}.moe.experts.down_projs"].shape == (E, I, D)
    assert vsd[f"model.layers.{layer}.moe.gate.e_score_correction_bias"].dtype == torch.float32
    assert vsd[f"model.layers.{layer}.moe.gate.weight"].shape == (E, D)
    assert not any(".moe.gate_proj" in k or "router_bias" in k for k in vsd)


def test_mapping_contract(tiny_ckpt: Path) -> None:
    vsd = VirtualStateDict(tiny_ckpt)
    keys = list(vsd)
    assert isinstance(vsd, Mapping)
    assert list(vsd.keys()) == keys == list(iter(vsd)) == list(VirtualStateDict(tiny_ckpt))
    assert len(vsd) == len(keys) == len(set(keys))
    assert keys[0] in vsd and "nope" not in vsd and 3 not in vsd
    assert vsd.get("nope") is None and vsd.get("nope", 7) == 7
    assert [k for k, _ in vsd.items()] == keys and len(list(vsd.values())) == len(keys)
    with pytest.raises(KeyError) as info:
        vsd["model.layers.1.moe.gate_proj.weight"]
    assert isinstance(info.value, MissingKeyError)
    assert str(info.value) == (
        f"{tiny_ckpt}: no native key 'model.layers.1.moe.gate_proj.weight'; 'model.layers.1.moe.gate_proj.weight' "
        "is an HF key, read through native key 'model.layers.1.moe.experts.gate_and_up_projs'"
    )
    assert vsd.bytes_read == 0


def test_keys_shapes_dtypes_read_no_tensor_bytes(tiny_ckpt: Path) -> None:
    vsd = VirtualStateDict(tiny_ckpt)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in vsd.items()}
    assert len(shapes) == len(vsd) and repr(vsd) and repr(vsd[next(iter(vsd))])
    assert vsd.bytes_read == 0 and vsd.checkpoint.read_calls == 0
    key = "model.layers.1.moe.experts.gate_and_up_projs"
    vsd[key].materialize()
    entry = vsd.entry(key)
    assert vsd.bytes_read == sum(s.info.nbytes for s in entry.sources) == entry.nbytes


def test_laziness_by_page_cache_residency(tmp_path: Path) -> None:
    """Independent of lazysd's counters: evict the files, open and list, count cached pages.

    Materializing a value is checked with ``direct=False``: by default a cold value is read
    with ``O_DIRECT``, which leaves no page cached, and starts the read-ahead of the rank's
    other values (tested with storage counters in test_pread.py)."""
    spec = Step3p5Spec.tiny(hidden_size=256, moe_intermediate_size=256, moe_num_experts=16)
    path = make_checkpoint(tmp_path / "c", spec, layout="sharded", shard_bytes=1 << 20)
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        evict(f)
    if any(resident_pages(f) for f in files):
        pytest.skip("this filesystem does not honour page-cache eviction")
    with VirtualStateDict(path) as listed:
        _ = {k: (v.shape, v.dtype) for k, v in listed.items()}
    # Only header pages: the first page of each file (headers are small here).
    assert all(resident_map(f)[1:] == [False] * (len(resident_map(f)) - 1) for f in files)
    vsd = VirtualStateDict(path, direct=False)
    key = "model.layers.2.moe.experts.down_projs"
    vsd[key].materialize()
    info = vsd.entry(key).sources[0].info
    cached = resident_map(info.file)
    first, last = info.offset // PAGE, (info.offset + info.nbytes - 1) // PAGE
    assert all(cached[first : last + 1])
    assert sum(cached) <= (last - first + 1) + 1  # the tensor's pages + the header page
    assert all(not any(resident_map(f)[1:]) for f in files if f != info.file)


def test_open_flash_sized_key_space_fast(tmp_path: Path) -> None:
    """Opening Flash's key space and listing every shape reads headers only and does work in
    proportion to the number of tensors: counted as Python calls, not timed (the machines
    that run the tests are shared). About 500 calls a tensor today; work quadratic in the
    804 tensors would be several times the bound."""
    import cProfile
    import pstats

    path = make_checkpoint(tmp_path / "flash", Step3p5Spec.flash(), layout="sharded", sparse=True)
    profile = cProfile.Profile()
    profile.enable()
    vsd = VirtualStateDict(path)
    shapes = [v.shape for v in vsd.values()]
    profile.disable()
    calls = sum(stat[1] for stat in pstats.Stats(profile).stats.values())  # type: ignore[attr-defined]
    assert calls < 1000 * len(vsd.checkpoint.tensors), calls
    assert len(shapes) == len(vsd)
    assert vsd["model.layers.3.moe.experts.gate_and_up_projs"].shape == (288, 4096, 2560)
    assert vsd.bytes_read == 0
    vsd.close()


def test_mtp_layers_hidden_by_default_and_namespaced_on_request(tiny_ckpt: Path) -> None:
    spec = SPECS["tiny"]
    n = spec.num_hidden_layers
    plain = VirtualStateDict(tiny_ckpt)
    assert not any(k.startswith(f"model.layers.{n}.") or k.startswith("mtp.") for k in plain)
    assert any(k.startswith(f"model.layers.{n}.") for k in plain.plan.ignored)
    with_mtp = VirtualStateDict(tiny_ckpt, include_mtp=True)
    mtp = sorted(k for k in with_mtp if k.startswith("mtp.layers.0."))
    assert "mtp.layers.0.eh_proj.weight" in mtp and "mtp.layers.0.transformer.shared_head.output.weight" in mtp
    hf = load_hf_tensors(tiny_ckpt)
    assert torch.equal(with_mtp["mtp.layers.0.eh_proj.weight"].materialize(), hf[f"model.layers.{n}.eh_proj.weight"])
    assert set(with_mtp) - set(plain) == set(mtp) | {k for k in with_mtp if k.startswith("mtp.layers.")}
    with pytest.raises(MissingKeyError, match="MTP layer"):
        plain[f"model.layers.{n}.eh_proj.weight"]


# ---- loading into models ---------------------------------------------------------------


def test_strict_load_into_native_model(tiny_ckpt: Path) -> None:
    spec = SPECS["tiny"]
    vsd = VirtualStateDict(tiny_ckpt)
    model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16)
    result = model.load_state_dict(vsd)
    assert not result.missing_keys and not result.unexpected_keys
    expected = native_state_dict(load_hf_tensors(tiny_ckpt), spec.num_hidden_layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key].to(value.dtype)), key


def test_hf_layout_and_native_layout_models_agree(tiny_ckpt: Path) -> None:
    """The conversion means the right thing: same model, same outputs, in both layouts."""
    spec = SPECS["tiny"]
    hf_model = Step3p5Model(spec, layout="hf", dtype=torch.float32)
    hf = {k: v for k, v in load_hf_tensors(tiny_ckpt).items() if k in hf_model.state_dict()}
    hf_model.load_state_dict(hf, strict=True)
    native_model = Step3p5Model(spec, layout="native", dtype=torch.float32)
    native_model.load_state_dict(VirtualStateDict(tiny_ckpt), strict=True)
    tokens = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf_model(tokens), native_model(tokens)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A wrong conversion (up first) must change the output: the test can fail.
    native_model.load_state_dict(VirtualStateDict(tiny_ckpt))
    layer = spec.moe_layers[0]
    w = native_model.state_dict()[f"model.layers.{layer}.moe.experts.gate_and_up_projs"]
    w.copy_(torch.cat(list(reversed(w.chunk(2, -1))), -1))
    with torch.no_grad():
        assert not torch.allclose(hf_model(tokens), native_model(tokens), atol=1e-4)


def test_assign_true_into_meta_model(tiny_ckpt: Path) -> None:
    spec = SPECS["tiny"]
    model = Step3p5Model(spec, layout="native", device="meta")
    model.load_state_dict(VirtualStateDict(tiny_ckpt), assign=True)
    assert all(type(p) is torch.nn.Parameter and p.requires_grad and not p.is_meta for p in model.parameters())
    assert all(type(b) is torch.Tensor for b in model.buffers())
    bias_key = f"model.layers.{spec.moe_layers[0]}.moe.gate.e_score_correction_bias"
    assert bias_key in dict(model.named_buffers()) and dict(model.named_buffers())[bias_key].dtype == torch.float32
    expected = native_state_dict(load_hf_tensors(tiny_ckpt), spec.num_hidden_layers)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


# ---- notebook use of values --------------------------------------------------------------


def test_lazy_values_behave_like_tensors(tiny_ckpt: Path) -> None:
    vsd = VirtualStateDict(tiny_ckpt)
    key = "model.layers.1.moe.experts.down_projs"
    lazy, full = vsd[key], vsd[key].materialize()
    assert repr(lazy) == f"LazyTensor(shape={list(full.shape)}, dtype=torch.bfloat16, key='{key}')"
    assert vsd.bytes_read == full.nbytes
    before = vsd.bytes_read
    assert torch.equal(lazy[3], full[3]) and vsd.bytes_read - before == full[3].nbytes  # one expert read
    assert torch.equal(lazy[1:3, 2], full[1:3, 2])
    assert torch.equal(lazy[True], full[True]) and torch.equal(lazy[False, 1], full[False, 1])  # masks, not rows
    assert torch.equal(lazy, full) and torch.equal(lazy.float(), full.float())
    assert (lazy == full).all() and torch.allclose(lazy + 1, full + 1)
    assert lazy.float().dtype == torch.float32 and type(lazy.float()) is torch.Tensor
    assert f"{lazy}" == repr(lazy)


# ---- errors ------------------------------------------------------------------------------


def _rewrite(
    path: Path,
    drop: set[str] = frozenset(),
    extra: dict[str, torch.Tensor] | None = None,
    reshape: dict[str, torch.Tensor] | None = None,
) -> None:
    """Rewrite a single-file checkpoint without some keys / with extra or replaced ones."""
    tensors = load_hf_tensors(path)
    tensors = {k: (reshape or {}).get(k, v) for k, v in tensors.items() if k not in drop}
    tensors.update(extra or {})
    save_file(tensors, path / "model.safetensors")


def test_error_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match=f"{tmp_path / 'nope'}: checkpoint directory does not exist"):
        VirtualStateDict(tmp_path / "nope")


def test_error_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "step3p5"}))
    with pytest.raises(NoWeightsError, match="no model.safetensors"):
        VirtualStateDict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(
        NoWeightsError, match=r"only pickled weights found \(pytorch_model.bin\); lazysd never unpickles"
    ):
        VirtualStateDict(tmp_path)


def test_error_index_names_missing_file_and_missing_key(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "c", SPECS["tiny"], layout="sharded", shard_bytes=1 << 14)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(CheckpointNotFoundError, match=f"names files that do not exist, for these keys:\n  {victim}: "):
        VirtualStateDict(path)
    path = make_checkpoint(tmp_path / "d", SPECS["tiny"], layout="sharded", shard_bytes=1 << 14)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.zz_proj.weight"] = next(iter(index["weight_map"].values()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointIndexError,
        match=r"model.layers.0.self_attn.zz_proj.weight: index says model-\d+-of-\d+.safetensors, which lacks it",
    ):
        VirtualStateDict(path)


def test_error_gate_without_up_and_up_without_gate(tmp_path: Path) -> None:
    for missing, present in [("up_proj", "gate_proj"), ("gate_proj", "up_proj")]:
        path = make_checkpoint(tmp_path / missing, SPECS["tiny"], layout="single")
        _rewrite(path, drop={f"model.layers.2.moe.{missing}.weight"})
        with pytest.raises(MissingSourceError) as info:
            VirtualStateDict(path)
        msg = str(info.value)
        assert f"model.layers.2.moe.experts.gate_and_up_projs needs model.layers.2.moe.{missing}.weight" in msg
        assert f"model.layers.2.moe.{present}.weight (model.safetensors)" in msg


def test_error_mismatched_gate_up_shapes(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "c", SPECS["tiny"], layout="single")
    spec = SPECS["tiny"]
    bad = torch.zeros(spec.moe_num_experts, spec.moe_intermediate_size, spec.hidden_size + 1, dtype=torch.bfloat16)
    _rewrite(path, reshape={"model.layers.2.moe.up_proj.weight": bad})
    with pytest.raises(
        ShapeMismatchError,
        match=r"model.layers.2.moe.experts.gate_and_up_projs cannot combine model.layers.2.moe.gate_proj.weight "
        r"\[8, 16, 32\] \(model.safetensors\) with model.layers.2.moe.up_proj.weight \[8, 16, 33\]",
    ):
        VirtualStateDict(path)


def test_error_unknown_model_type_and_override(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "c", SPECS["tiny"], layout="single")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))
    with pytest.raises(
        UnknownModelError, match=r"config.json: model_type 'llama9' is not supported \(supported: .*step3p5"
    ):
        VirtualStateDict(path)
    assert len(VirtualStateDict(path, adapter="step3p5")) > 0
    with pytest.raises(UnknownModelError, match="adapter 'nope' is not registered"):
        VirtualStateDict(path, adapter="nope")


def test_error_unclaimed_key_is_listed(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "c", SPECS["tiny"], layout="single")
    _rewrite(path, extra={"model.layers.2.moe.mystery.weight": torch.zeros(2), "extra_head.bias": torch.zeros(1)})
    with pytest.raises(UnclaimedKeyError) as info:
        VirtualStateDict(path)
    assert str(info.value) == (
        f"{path}: 2 checkpoint key(s) match no rule of the step3p5 adapter:\n"
        "  model.layers.2.moe.mystery.weight  (model.safetensors)\n"
        "  extra_head.bias  (model.safetensors)"
    )


def test_all_errors_share_one_base() -> None:
    import lazysd.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert all(issubclass(c, LazySDError) for c in classes)
    assert issubclass(MissingKeyError, KeyError) and issubclass(CheckpointNotFoundError, FileNotFoundError)


# ---- CLI ---------------------------------------------------------------------------------


def test_cli_inspect_reads_no_tensor_data(tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["inspect", str(tiny_ckpt), "--all"]) == 0
    out = capsys.readouterr().out
    assert "family='step3p5'" in out
    assert (
        "model.layers.1.moe.experts.gate_and_up_projs" in out and "model.layers.1.moe.gate_proj.weight + 1 more" in out
    )
    assert out.rstrip().endswith("tensor bytes read: 0")


def test_cli_demo_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "<All keys matched successfully>" in out and "forward pass" in out
    assert cli_main(["inspect", str(tmp_path / "none")]) == 2
    assert "lazysd: error:" in capsys.readouterr().err


def test_python_dash_m(tiny_ckpt: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "lazysd", "inspect", str(tiny_ckpt)], capture_output=True, text=True, check=True
    ).stdout
    assert "native keys" in out
