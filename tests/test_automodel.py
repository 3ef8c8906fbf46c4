"""lazysd.automodel: the Step3p5StateDictAdapter API (public behaviour) run by lazysd's engine."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lazysd import LazyTensor, MissingSourceError, ShapeMismatchError
from lazysd.automodel import (
    HFCheckpointView,
    Step3p5StateDictAdapter,
    _create_dtensor_from_local_or_reference,
    _swap_shard_placements_1_2,
)
from lazysd.errors import MissingKeyError
from lazysd.testing import Step3p5Model, Step3p5Spec, load_hf_tensors, make_checkpoint
from tests.support.checks import same_bits

E, I, D = 4, 3, 5  # experts, expert intermediate, hidden
L1 = "model.layers.1"


def _adapter(dtype: torch.dtype = torch.float32, **moe: object) -> Step3p5StateDictAdapter:
    moe_config = SimpleNamespace(**({"n_routed_experts": E, "moe_inter_dim": I, "dim": D} | moe))
    return Step3p5StateDictAdapter(SimpleNamespace(num_hidden_layers=4), moe_config, SimpleNamespace(), dtype=dtype)


def _experts(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g)
    down = torch.randn(E, D, I, generator=g)
    return gate.to(dtype), up.to(dtype), down.to(dtype)


# ---- from_hf -----------------------------------------------------------------------------
def test_from_hf_gate_and_up_only() -> None:
    gate, up, _ = _experts()
    out = _adapter(torch.bfloat16).from_hf({f"{L1}.moe.gate_proj.weight": gate, f"{L1}.moe.up_proj.weight": up})
    assert list(out) == [f"{L1}.moe.experts.gate_and_up_projs"]
    fused = out[f"{L1}.moe.experts.gate_and_up_projs"]
    assert fused.shape == (E, D, 2 * I) and fused.dtype == torch.bfloat16
    assert same_bits(fused, torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=-1).to(torch.bfloat16))
    assert same_bits(fused[:, :, :I], gate.transpose(1, 2).to(torch.bfloat16))  # gate first, not interleaved


def test_from_hf_down_only() -> None:
    _, _, down = _experts()
    out = _adapter().from_hf({f"{L1}.moe.down_proj.weight": down})
    assert list(out) == [f"{L1}.moe.experts.down_projs"]
    assert same_bits(out[f"{L1}.moe.experts.down_projs"], down.transpose(1, 2).contiguous())
    assert out[f"{L1}.moe.experts.down_projs"].shape == (E, I, D)


def test_from_hf_routers_only_rename_bias_and_keep_values() -> None:
    weight, bias = torch.randn(E, D), torch.randn(E)
    out = _adapter(torch.bfloat16).from_hf({f"{L1}.moe.gate.weight": weight, f"{L1}.moe.router_bias": bias})
    assert list(out) == [f"{L1}.moe.gate.weight", f"{L1}.moe.gate.e_score_correction_bias"]
    assert out[f"{L1}.moe.gate.weight"] is weight  # passes through, not cast
    assert out[f"{L1}.moe.gate.e_score_correction_bias"] is bias


@pytest.mark.parametrize("prefix", ["", "model.", "model.language_model."])
def test_from_hf_keeps_each_prefix(prefix: str) -> None:
    gate, up, down = _experts()
    hf = {
        f"{prefix}layers.2.moe.gate_proj.weight": gate,
        f"{prefix}layers.2.moe.up_proj.weight": up,
        f"{prefix}layers.2.moe.down_proj.weight": down,
        f"{prefix}layers.2.moe.router_bias": torch.zeros(E),
    }
    out = _adapter().from_hf(hf)
    assert list(out) == [
        f"{prefix}layers.2.moe.experts.gate_and_up_projs",
        f"{prefix}layers.2.moe.experts.down_projs",
        f"{prefix}layers.2.moe.gate.e_score_correction_bias",
    ]
    back = _adapter().to_hf(out)
    assert set(back) == set(hf)
    assert all(same_bits(back[k], hf[k]) for k in hf)


def test_from_hf_several_layers_in_any_order() -> None:
    a, b = _experts(1), _experts(2)
    hf = {
        "model.layers.3.moe.up_proj.weight": b[1],
        "model.layers.1.moe.gate_proj.weight": a[0],
        "model.layers.3.moe.down_proj.weight": b[2],
        "model.layers.1.moe.up_proj.weight": a[1],
        "model.layers.3.moe.gate_proj.weight": b[0],
    }
    out = _adapter().from_hf(hf)
    assert list(out) == [
        "model.layers.3.moe.experts.gate_and_up_projs",
        "model.layers.1.moe.experts.gate_and_up_projs",
        "model.layers.3.moe.experts.down_projs",
    ]
    assert same_bits(out["model.layers.3.moe.experts.gate_and_up_projs"], torch.cat([b[0].mT, b[1].mT], -1))
    assert same_bits(out["model.layers.1.moe.experts.gate_and_up_projs"], torch.cat([a[0].mT, a[1].mT], -1))


def test_from_hf_passes_other_keys_through_mtp_included() -> None:
    hf = {
        "model.embed_tokens.weight": torch.randn(7, D),
        "lm_head.weight": torch.randn(7, D),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(6, D),
        "model.layers.1.share_expert.down_proj.weight": torch.randn(D, 6),
        "model.layers.4.eh_proj.weight": torch.randn(D, 2 * D),  # MTP layer: kept under its HF key
        "model.layers.4.transformer.shared_head.output.weight": torch.randn(7, D),
        "model.layers.1.moe.gate_proj.weight_scale": torch.ones(1),  # not an expert weight
        "something.else": torch.ones(2),
    }
    out = _adapter(torch.bfloat16).from_hf(hf)
    assert list(out) == list(hf)
    assert all(out[k] is hf[k] for k in hf)


def test_from_hf_unpaired_gate_or_up_is_an_error() -> None:
    gate, up, _ = _experts()
    with pytest.raises(MissingSourceError, match=r"hf_state_dict: model\.layers\.1\.moe\.gate_proj\.weight has no matching model\.layers\.1\.moe\.up_proj\.weight"):
        _adapter().from_hf({f"{L1}.moe.gate_proj.weight": gate})
    with pytest.raises(MissingSourceError, match=r"layers\.2\.moe\.up_proj\.weight has no matching layers\.2\.moe\.gate_proj\.weight"):
        _adapter().from_hf({"layers.2.moe.up_proj.weight": up})


def test_from_hf_checks_shapes_and_expert_count() -> None:
    gate, up, down = _experts()
    with pytest.raises(ShapeMismatchError, match=r"model\.layers\.1\.moe\.down_proj\.weight has 4 experts .*moe_config\.n_routed_experts is 8"):
        _adapter(n_routed_experts=8).from_hf({f"{L1}.moe.down_proj.weight": down})
    with pytest.raises(ShapeMismatchError, match=r"gate_and_up_projs cannot combine"):
        _adapter().from_hf({f"{L1}.moe.gate_proj.weight": gate, f"{L1}.moe.up_proj.weight": up[:, :, :2]})
    with pytest.raises(ShapeMismatchError, match=r"different dtypes"):
        _adapter().from_hf({f"{L1}.moe.gate_proj.weight": gate, f"{L1}.moe.up_proj.weight": up.double()})


# ---- to_hf -------------------------------------------------------------------------------
def test_to_hf_splits_and_transposes() -> None:
    fused, down = torch.randn(E, D, 2 * I), torch.randn(E, I, D)
    hf = _adapter().to_hf({f"{L1}.moe.experts.gate_and_up_projs": fused, f"{L1}.moe.experts.down_projs": down})
    assert list(hf) == [f"{L1}.moe.gate_proj.weight", f"{L1}.moe.up_proj.weight", f"{L1}.moe.down_proj.weight"]
    assert same_bits(hf[f"{L1}.moe.gate_proj.weight"], fused[:, :, :I].transpose(1, 2).contiguous())
    assert same_bits(hf[f"{L1}.moe.up_proj.weight"], fused[:, :, I:].transpose(1, 2).contiguous())
    assert same_bits(hf[f"{L1}.moe.down_proj.weight"], down.transpose(1, 2).contiguous())
    assert all(v.is_contiguous() for v in hf.values())


def test_to_hf_router_bias_and_legacy_gate_bias() -> None:
    bias, legacy, weight = torch.randn(E), torch.randn(E), torch.randn(E, D)
    hf = _adapter().to_hf(
        {f"{L1}.moe.gate.e_score_correction_bias": bias, "model.layers.2.moe.gate.bias": legacy, f"{L1}.moe.gate.weight": weight}
    )
    assert list(hf) == [f"{L1}.moe.router_bias", "model.layers.2.moe.router_bias", f"{L1}.moe.gate.weight"]
    assert hf[f"{L1}.moe.router_bias"] is bias and hf["model.layers.2.moe.router_bias"] is legacy
    assert hf[f"{L1}.moe.gate.weight"] is weight


def test_to_hf_exclude_key_regex_matches_output_keys_from_the_start() -> None:
    native = {
        f"{L1}.moe.experts.gate_and_up_projs": torch.randn(E, D, 2 * I),
        f"{L1}.moe.gate.e_score_correction_bias": torch.randn(E),
        "model.norm.weight": torch.randn(D),
    }
    a = _adapter()
    assert list(a.to_hf(native, exclude_key_regex=r"model\.layers\.1\.moe\.up_proj")) == [
        f"{L1}.moe.gate_proj.weight",
        f"{L1}.moe.router_bias",
        "model.norm.weight",
    ]
    # The regex applies to HF keys: the native name of the bias no longer exists.
    assert f"{L1}.moe.router_bias" not in a.to_hf(native, exclude_key_regex=r".*router_bias")
    assert len(a.to_hf(native, exclude_key_regex=r".*e_score_correction_bias")) == 4
    # re.match anchors at the start: a bare substring does not exclude anything.
    assert len(a.to_hf(native, exclude_key_regex=r"up_proj")) == 4
    assert len(a.to_hf(native, quantization=True)) == 4  # accepted, no effect for Step3p5


def test_to_hf_checks_moe_inter_dim() -> None:
    with pytest.raises(ShapeMismatchError, match=r"gate_and_up_projs has shape \[4, 5, 6\]: dim 2 should be 2 x moe_config.moe_inter_dim=4"):
        _adapter(moe_inter_dim=4).to_hf({f"{L1}.moe.experts.gate_and_up_projs": torch.randn(E, D, 2 * I)})


def test_convert_single_tensor_to_hf() -> None:
    a = _adapter()
    down = torch.randn(E, I, D)
    [(key, value)] = a.convert_single_tensor_to_hf(f"{L1}.moe.experts.down_projs", down)
    assert key == f"{L1}.moe.down_proj.weight" and same_bits(value, down.mT.contiguous())
    other = torch.randn(3)
    assert a.convert_single_tensor_to_hf("model.layers.0.self_attn.q_norm.weight", other) == [("model.layers.0.self_attn.q_norm.weight", other)]
    assert a.convert_single_tensor_to_hf("not.a.model.key", other) == [("not.a.model.key", other)]
    assert a.convert_single_tensor_to_hf("not.a.model.key", other, exclude_key_regex=r"not\.") == []
    keys = [k for k, _ in a.convert_single_tensor_to_hf(f"{L1}.moe.experts.gate_and_up_projs", torch.randn(E, D, 2 * I), exclude_key_regex=".*gate_proj")]
    assert keys == [f"{L1}.moe.up_proj.weight"]
    assert a._convert_native_to_hf("model.norm.weight", other) is None
    assert a._convert_native_to_hf(f"{L1}.moe.gate.weight", other) is None


def test_round_trip_hf_native_hf_bitwise_on_a_full_checkpoint(tmp_path: Path) -> None:
    hf = load_hf_tensors(make_checkpoint(tmp_path / "ckpt", Step3p5Spec.tiny(), layout="single"))
    a = _adapter(torch.bfloat16, n_routed_experts=8, moe_inter_dim=16)
    native = a.from_hf(hf)
    assert "model.layers.4.eh_proj.weight" in native  # MTP layer passes through
    assert sum("gate_and_up_projs" in k for k in native) == 3
    back = a.to_hf(native)
    assert set(back) == set(hf)
    for key in hf:
        assert same_bits(back[key], hf[key]), key


def test_helpers_without_a_mesh() -> None:
    from torch.distributed.tensor import Replicate, Shard

    t = torch.randn(2, 3)
    assert _create_dtensor_from_local_or_reference(t, None) is t
    assert _create_dtensor_from_local_or_reference(t, torch.randn(2, 3)) is t  # a plain reference is ignored
    assert _swap_shard_placements_1_2((Shard(1), Shard(0))) == (Shard(2), Shard(0))
    assert _swap_shard_placements_1_2((Shard(2), Replicate(), Shard(3))) == (Shard(1), Replicate(), Shard(3))


# ---- lazy --------------------------------------------------------------------------------
def test_from_hf_of_a_lazy_view_reads_nothing_until_used(tmp_path: Path) -> None:
    spec = Step3p5Spec.tiny()
    path = make_checkpoint(tmp_path / "ckpt", spec, layout="split")  # gate, up, down in three files
    eager = _adapter(torch.bfloat16, n_routed_experts=8, moe_inter_dim=16).from_hf(load_hf_tensors(path))
    with HFCheckpointView(path) as view:
        native = _adapter(torch.bfloat16, n_routed_experts=8, moe_inter_dim=16).from_hf(view)
        assert view.bytes_read == 0
        fused = native["model.layers.2.moe.experts.gate_and_up_projs"]
        assert isinstance(fused, LazyTensor) and fused.shape == (8, 32, 32) and fused.dtype == torch.bfloat16
        assert fused.entry.hf_keys == ("model.layers.2.moe.gate_proj.weight", "model.layers.2.moe.up_proj.weight")
        assert repr(fused).startswith("LazyTensor(shape=[8, 32, 32]")
        assert view.bytes_read == 0

        dest = torch.empty(8, 32, 32, dtype=torch.bfloat16)
        dest.copy_(fused)  # what load_state_dict does
        assert view.bytes_read == fused.entry.nbytes == 8 * 32 * 32 * 2
        assert same_bits(dest, eager["model.layers.2.moe.experts.gate_and_up_projs"])

        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16)
        result = model.load_state_dict(native, strict=False)
        assert result.missing_keys == [] and all(".layers.4." in k for k in result.unexpected_keys)
        for key, value in model.state_dict().items():
            assert same_bits(value, eager[key]), key


def test_hf_checkpoint_view_is_a_mapping(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ckpt", Step3p5Spec.tiny(), layout="sharded")
    hf = load_hf_tensors(path)
    with HFCheckpointView(path) as view:
        assert set(view) == set(hf) and len(view) == len(hf) and "model.norm.weight" in view
        assert view.bytes_read == 0
        norm = view["model.norm.weight"]
        assert isinstance(norm, LazyTensor) and same_bits(norm.materialize(), hf["model.norm.weight"])
        assert view.bytes_read == hf["model.norm.weight"].nbytes
        with pytest.raises(MissingKeyError, match=r"no HF key 'model\.nope'"):
            view["model.nope"]
        assert repr(view).startswith("HFCheckpointView(")


def test_mixed_lazy_and_eager_parts_are_converted_eagerly(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "ckpt", Step3p5Spec.tiny(), layout="single")
    hf = load_hf_tensors(path)
    with HFCheckpointView(path) as view:
        mixed = {"model.layers.1.moe.gate_proj.weight": view["model.layers.1.moe.gate_proj.weight"], "model.layers.1.moe.up_proj.weight": hf["model.layers.1.moe.up_proj.weight"]}
        out = _adapter(torch.bfloat16, n_routed_experts=8).from_hf(mixed)
        fused = out["model.layers.1.moe.experts.gate_and_up_projs"]
        assert not isinstance(fused, LazyTensor)
        g, u = hf["model.layers.1.moe.gate_proj.weight"], hf["model.layers.1.moe.up_proj.weight"]
        assert same_bits(fused, torch.cat([g.mT, u.mT], -1))



# ---- memory kept as Automodel keeps it; write-through loading ------------------------------
def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_from_hf_keeps_down_projs_a_view_and_allocates_only_the_fused_tensor() -> None:
    gate, up, down = _experts()
    hf = {f"{L1}.moe.gate_proj.weight": gate, f"{L1}.moe.up_proj.weight": up, f"{L1}.moe.down_proj.weight": down}
    out = _adapter().from_hf(hf)
    native_down = out[f"{L1}.moe.experts.down_projs"]
    assert _shares(native_down, down) and native_down.stride() == down.mT.stride()  # a transposed view, as Automodel's
    fused = out[f"{L1}.moe.experts.gate_and_up_projs"]
    assert not _shares(fused, gate) and not _shares(fused, up) and fused.is_contiguous()
    # A dtype change copies, as Automodel's .to(dtype) does.
    cast = _adapter(torch.bfloat16).from_hf({f"{L1}.moe.down_proj.weight": down})[f"{L1}.moe.experts.down_projs"]
    assert not _shares(cast, down) and same_bits(cast, down.mT.to(torch.bfloat16))


def test_to_hf_for_checkpoint_load_returns_views_of_the_native_tensors() -> None:
    fused, down, norm = torch.randn(E, D, 2 * I), torch.randn(E, I, D), torch.randn(D)
    native = {f"{L1}.moe.experts.gate_and_up_projs": fused, f"{L1}.moe.experts.down_projs": down, "model.norm.weight": norm}
    a = _adapter()
    hf = a.to_hf(native, exclude_key_regex=r".*_extra_state.*", for_checkpoint_load=True)
    assert list(hf) == [f"{L1}.moe.gate_proj.weight", f"{L1}.moe.up_proj.weight", f"{L1}.moe.down_proj.weight", "model.norm.weight"]
    gate, up, hf_down = hf[f"{L1}.moe.gate_proj.weight"], hf[f"{L1}.moe.up_proj.weight"], hf[f"{L1}.moe.down_proj.weight"]
    assert gate.shape == up.shape == (E, I, D) and hf_down.shape == (E, D, I)
    assert all(_shares(v, fused) for v in (gate, up)) and _shares(hf_down, down) and hf["model.norm.weight"] is norm
    assert same_bits(gate, fused[:, :, :I].mT) and same_bits(up, fused[:, :, I:].mT) and same_bits(hf_down, down.mT)
    # Writing the HF values writes the native tensors: what a DCP load does.
    g, u, d = torch.randn(E, I, D), torch.randn(E, I, D), torch.randn(E, D, I)
    gate.copy_(g), up.copy_(u), hf_down.copy_(d)
    assert same_bits(fused, torch.cat([g.mT, u.mT], -1)) and same_bits(down, d.mT)
    # from_hf recognises every value it handed out: nothing rebuilt, every native key loaded.
    assert a.from_hf(hf) == {}
    assert a.view_loaded_native_keys == set(native)
    # Handed out once: the same dict again is converted as plain tensors.
    again = a.from_hf(hf)
    assert set(again) == set(native) and a.view_loaded_native_keys == set()
    # Saving (the default) still gives contiguous copies.
    assert all(v.is_contiguous() and not _shares(v, fused) for k, v in a.to_hf(native).items() if "gate" in k or "up" in k)


def test_a_value_put_in_place_of_a_view_is_copied_into_the_model() -> None:
    fused = torch.randn(E, D, 2 * I)
    a = _adapter()
    hf = a.to_hf({f"{L1}.moe.experts.gate_and_up_projs": fused}, for_checkpoint_load=True)
    g = torch.randn(E, I, D)
    hf[f"{L1}.moe.gate_proj.weight"] = g  # e.g. a loader that allocated its own destination
    hf[f"{L1}.moe.up_proj.weight"].copy_(torch.ones(E, I, D))
    assert a.from_hf(hf) == {} and a.view_loaded_native_keys == {f"{L1}.moe.experts.gate_and_up_projs"}
    assert same_bits(fused, torch.cat([g.mT, torch.ones(E, D, I)], -1))
    # A value of another shape is no load destination: it is converted as given.
    hf = a.to_hf({f"{L1}.moe.experts.down_projs": torch.randn(E, I, D)}, for_checkpoint_load=True)
    other = torch.randn(E, D + 1, I)
    out = a.from_hf({f"{L1}.moe.down_proj.weight": other})
    assert list(out) == [f"{L1}.moe.experts.down_projs"] and same_bits(out[f"{L1}.moe.experts.down_projs"], other.mT)


def test_write_through_dcp_load_with_torchs_hf_reader_fills_the_model_in_place(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from lazysd import VirtualStateDict

    spec = Step3p5Spec.tiny()
    path = make_checkpoint(tmp_path / "ckpt", spec, layout="sharded")
    model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    a = _adapter(torch.bfloat16, n_routed_experts=8, moe_inter_dim=16)
    hf = a.to_hf(model.state_dict(), for_checkpoint_load=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
        dcp.load(hf, storage_reader=HuggingFaceStorageReader(str(path)))
    assert a.from_hf(hf) == {} and a.view_loaded_native_keys == set(before)
    after = model.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == before
    with VirtualStateDict(path) as vsd:
        for key, value in after.items():
            assert same_bits(value, vsd[key].materialize()), key
