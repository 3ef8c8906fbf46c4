"""Loading through load_state_dict and lazysd.load: memory bound, single reads, options."""

from __future__ import annotations

import io
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

import lazysd
from lazysd import LazyTensor, LoadReport, StateDictMismatchError, VirtualStateDict
from lazysd.progress import ProgressPrinter
from lazysd.testing import Step3p5Model, Step3p5Spec, load_hf_tensors, make_checkpoint, native_state_dict
from tests.support.measure import record_reads, run_fresh

MiB = 2**20
# Big enough that expert tensors span several 8 KiB chunks and pipelined reads overlap.
SPEC = Step3p5Spec.tiny(moe_num_experts=16, moe_intermediate_size=32, hidden_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), SPEC, layout="split")


@pytest.fixture(scope="module")
def hf(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_hf_tensors(ckpt)


def expected_native(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The native state dict built eagerly with torch ops (the reference conversion)."""
    return native_state_dict(hf, SPEC.num_hidden_layers)


def hf_nbytes(vsd: VirtualStateDict, keys) -> int:
    return sum(s.info.nbytes for k in keys for s in vsd.entry(k).sources)


@pytest.fixture
def count_materialize(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts LazyTensor.materialize calls per native key."""
    calls: Counter = Counter()
    original = LazyTensor.materialize

    def counting(self, **kwargs):
        calls[self.entry.key] += 1
        return original(self, **kwargs)

    monkeypatch.setattr(LazyTensor, "materialize", counting)
    return calls


def assert_read_once(reads: list[tuple[str, int, int]], infos: dict) -> None:
    """Each listed HF tensor's bytes were read exactly once: disjoint ranges that cover it."""
    by_key: dict[str, list[tuple[int, int]]] = {}
    for key, start, n in reads:
        by_key.setdefault(key, []).append((start, n))
    assert sorted(by_key) == sorted(infos)
    for key, ranges in by_key.items():
        pos = 0
        for start, n in sorted(ranges):
            assert start == pos, f"{key}: gap or overlap at byte {pos}"
            pos += n
        assert pos == infos[key].nbytes, key


# ---- assign=False: copy_ into allocated parameters --------------------------------------
def test_load_state_dict_streams_into_parameters(ckpt, hf, count_materialize) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(ckpt, chunk_bytes=8 * 1024, max_inflight_bytes=32 * 1024) as vsd:
        reads = record_reads(vsd)
        result = model.load_state_dict(vsd)
        assert result.missing_keys == [] and result.unexpected_keys == []
        # No value became a full tensor: every byte went straight into a parameter.
        assert sum(count_materialize.values()) == 0
        assert vsd.stats.staging_peak <= 32 * 1024 + 8 * 1024
        assert vsd.stats.staging_live == 0
        # Each HF byte of the main layers read exactly once (gate and up once each).
        infos = {s.info.key: s.info for e in vsd.plan.entries.values() for s in e.sources}
        assert_read_once(reads, infos)
        assert vsd.bytes_read == sum(i.nbytes for i in infos.values())
    expected = expected_native(hf)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def test_staging_stays_within_a_small_inflight_bound(ckpt, hf) -> None:
    # Cast on the way (bf16 -> fp32, lossless): every chunk is staged, then copied.
    model = Step3p5Model(SPEC, layout="native", dtype=torch.float32)
    chunk, budget = 2048, 4096
    with VirtualStateDict(ckpt, chunk_bytes=chunk, max_inflight_bytes=budget, threads=4, dtype=torch.float32) as vsd:
        model.load_state_dict(vsd)
        assert 0 < vsd.stats.staging_peak <= budget + chunk
    key = "model.layers.1.moe.experts.gate_and_up_projs"
    assert torch.equal(model.state_dict()[key], expected_native(hf)[key].float())


@pytest.mark.parametrize("threads", [0, 1, 4])
def test_thread_counts_give_identical_results(ckpt, hf, threads: int) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(ckpt, threads=threads, chunk_bytes=4096) as vsd:
        model.load_state_dict(vsd)
    for k, v in expected_native(hf).items():
        assert torch.equal(model.state_dict()[k], v), k


def test_missing_model_keys_are_never_read(ckpt) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    del model.model.layers[3]  # its MoE experts are no longer asked for
    del model.lm_head
    with VirtualStateDict(ckpt) as vsd:
        reads = record_reads(vsd)
        result = model.load_state_dict(vsd, strict=False)
        asked = [k for k in vsd if k in model.state_dict()]
        assert set(result.unexpected_keys) == set(vsd) - set(asked)
        assert vsd.bytes_read == hf_nbytes(vsd, asked)
        assert not any(".layers.3." in key or key == "lm_head.weight" for key, _, _ in reads)


# ---- assign=True into a meta model ------------------------------------------------------
def test_assign_into_meta_model_materializes_each_parameter_once(ckpt, hf, count_materialize) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16, device="meta")
    frozen = {"model.embed_tokens.weight", "model.layers.1.moe.experts.down_projs", "model.norm.weight"}
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    with VirtualStateDict(ckpt) as vsd:
        model.load_state_dict(vsd, assign=True)
        assert vsd.bytes_read == hf_nbytes(vsd, vsd.keys())
    state = dict(model.named_parameters())
    assert count_materialize == Counter({k: 1 for k in model.state_dict()})
    for name, p in state.items():
        assert type(p) is torch.nn.Parameter and not p.is_meta, name
        assert p.dtype == torch.bfloat16 and p.requires_grad == (name not in frozen), name
    bias_owner = model.model.layers[1].moe.gate
    assert "e_score_correction_bias" in bias_owner._buffers and "e_score_correction_bias" not in bias_owner._parameters
    bias = bias_owner.e_score_correction_bias
    assert type(bias) is torch.Tensor and bias.dtype == torch.float32
    for k, v in expected_native(hf).items():
        assert torch.equal(model.state_dict()[k], v), k
    # The materialized model trains: gradients flow into the loaded parameters.
    model(torch.tensor([[1, 2, 3]])).float().sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is None


@pytest.mark.parametrize("assign", [False, True])
def test_swap_module_params_on_conversion(ckpt, hf, assign: bool) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16, device="meta" if assign else None)
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with VirtualStateDict(ckpt) as vsd:
            model.load_state_dict(vsd, assign=assign)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    for name, p in model.named_parameters():
        assert type(p) is torch.nn.Parameter and not p.is_meta, name
    for name, b in model.named_buffers():
        assert type(b) is torch.Tensor, name
    for k, v in expected_native(hf).items():
        assert torch.equal(model.state_dict()[k], v), k


# ---- options ----------------------------------------------------------------------------
def test_dtype_cast_and_device(ckpt, hf) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.float32, device="meta")
    with VirtualStateDict(ckpt, dtype=torch.float32, device="cpu") as vsd:
        model.load_state_dict(vsd, assign=True)
    for k, v in expected_native(hf).items():
        got = model.state_dict()[k]
        assert got.dtype == torch.float32 and got.device.type == "cpu", k
        assert torch.equal(got, v.float()), k
    # assign=False into an fp32 model: the cast happens in the copy, bitwise as torch's.
    model32 = Step3p5Model(SPEC, layout="native", dtype=torch.float32)
    with VirtualStateDict(ckpt) as vsd:
        model32.load_state_dict(vsd)
    key = "model.layers.2.moe.experts.gate_and_up_projs"
    assert torch.equal(model32.state_dict()[key], expected_native(hf)[key].float())


def test_progress_is_off_by_default_and_prints_when_asked(ckpt, capsys) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    lazysd.load(model, ckpt)
    assert capsys.readouterr().err == ""
    report = lazysd.load(model, ckpt, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rlazysd: ") and "100.0%" in err and err.endswith("MiB/s\n")
    assert f"{report.tensors} tensors" in err
    seen = []
    lazysd.load(model, ckpt, progress=lambda stats, entry: seen.append(entry.key))
    assert sorted(seen) == sorted(model.state_dict())  # each once, as its last chunk lands
    stream = io.StringIO()
    printer = ProgressPrinter(100, stream=stream, every=3600)
    printer(lazysd.reader.Stats(tensors=1, bytes_out=10), None)
    assert stream.getvalue() == ""  # rate-limited: nothing until the interval or the end


@pytest.mark.parametrize("options", [{"dtype": torch.float32}, {"mmap": True}], ids=["cast", "mmap"])
def test_progress_ends_at_its_total_once(ckpt, capsys, options) -> None:
    # The total counts what the reader counts: bytes at the dtype read as, mapped tensors too.
    dtype = options.get("dtype", torch.bfloat16)
    model = Step3p5Model(SPEC, layout="native", dtype=dtype, device="meta")
    lazysd.load(model, ckpt, assign=True, progress=True, **options)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("MiB/s\n")
    last = err.rstrip("\n").split("\r")[-1]
    assert "(100.0%)" in last and f"{len(model.state_dict())} tensors" in last


# ---- lazysd.load ------------------------------------------------------------------------
def test_load_reports_keys_bytes_and_time(ckpt) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    del model.lm_head
    with VirtualStateDict(ckpt) as vsd:
        report = lazysd.load(model, vsd, strict=False)
        asked = list(model.state_dict())
        assert report.bytes_read == vsd.bytes_read == hf_nbytes(vsd, asked)
    assert isinstance(report, LoadReport)
    assert report.missing_keys == () and report.unexpected_keys == ("lm_head.weight",)
    assert report.tensors == len(asked) and report.seconds > 0 and report.throughput > 0
    assert "0 missing, 1 unexpected keys" in str(report)
    with pytest.raises(AttributeError):
        report.tensors = 0  # type: ignore[misc]


def test_load_strict_fails_before_reading(ckpt) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    del model.lm_head
    with VirtualStateDict(ckpt) as vsd:
        with pytest.raises(
            StateDictMismatchError, match=r"nothing was read.*0 missing \[\], 1 unexpected \[lm_head.weight\]"
        ) as info:
            lazysd.load(model, vsd)
        assert str(ckpt) in str(info.value)
        assert vsd.bytes_read == 0
    assert isinstance(info.value, RuntimeError)


def test_load_assign_with_options_from_a_path(ckpt, hf) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.float32, device="meta")
    report = lazysd.load(model, ckpt, assign=True, dtype=torch.float32, device="cpu", threads=1, max_inflight_bytes=MiB)
    assert report.missing_keys == report.unexpected_keys == ()
    for k, v in expected_native(hf).items():
        assert torch.equal(model.state_dict()[k], v.float()), k


def test_load_assign_mmap_reads_only_concatenations(ckpt, hf) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16, device="meta")
    report = lazysd.load(model, ckpt, assign=True, mmap=True)
    state = model.state_dict()
    gate_up = [k for k in state if k.endswith("gate_and_up_projs")]
    assert report.bytes_read == sum(state[k].nbytes for k in gate_up)
    for k, v in expected_native(hf).items():
        assert torch.equal(state[k], v), k


def test_load_refuses_options_for_an_open_vsd(ckpt) -> None:
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(ckpt) as vsd:
        with pytest.raises(ValueError, match=r"dtype, threads cannot change an open VirtualStateDict"):
            lazysd.load(model, vsd, dtype=torch.float32, threads=4)


# ---- memory, measured in a fresh process ------------------------------------------------
def test_peak_rss_of_a_200mb_load_stays_within_the_bound(tmp_path: Path) -> None:
    spec = Step3p5Spec.sized(200 * 10**6)
    path = make_checkpoint(tmp_path / "ckpt", spec, layout="sharded")
    script = textwrap.dedent(
        f"""
        import json, torch
        from lazysd import VirtualStateDict
        from lazysd.testing import Step3p5Model, Step3p5Spec
        from tests.support.measure import PeakRSS

        spec = Step3p5Spec.sized({200 * 10**6})
        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16)  # allocated and touched
        vsd = VirtualStateDict({str(path)!r})
        largest = max(e.nbytes for e in vsd.plan.entries.values())
        with PeakRSS(sample_s=None) as peak:  # VmHWM above the RSS before the load
            model.load_state_dict(vsd)
        print(json.dumps({{"extra": peak.total, "largest": largest, "bytes": vsd.bytes_read}}))
        """
    )
    got = run_fresh("-c", script)
    assert "error" not in got, got
    assert got["bytes"] > 150 * 10**6
    assert got["extra"] <= 1.25 * got["largest"] + 64 * MiB, got


def test_peak_rss_of_a_cold_per_expert_load_stays_within_the_bound(tmp_path: Path) -> None:
    """A cold ``load_state_dict`` of a per-expert release into a model that lists
    ``down_projs`` before ``gate_and_up_projs``: each piece read ahead is a third served by
    one fill, so the read-ahead grows its slots, to what the memory bound leaves once the
    staging is set aside; the peak stays within the bound, and the values are right."""
    from lazysd.testing.families import FamilySpec, eager_native, make_family_checkpoint
    from tests.support.pagecache import evict

    # 32 experts of 1 MiB a role: a 96 MiB layer, its largest value (gate_and_up) 64 MiB.
    spec = FamilySpec(
        family="qwen3_moe",
        num_hidden_layers=3,
        first_dense=0,
        num_experts=32,
        hidden_size=1024,
        moe_intermediate_size=512,
        vocab_size=1024,
    )
    path = make_family_checkpoint(tmp_path / "ckpt", spec)
    # Clones: mapped pages would stay cached.
    eager = eager_native(spec, {k: v.clone() for k, v in load_hf_tensors(path).items()})
    for f in path.glob("*.safetensors"):
        evict(f)
    script = textwrap.dedent(
        f"""
        import json, torch
        from lazysd import VirtualStateDict, prefetch
        from lazysd.testing.families import ParamTree
        from tests.support.measure import PeakRSS

        vsd = VirtualStateDict({str(path)!r})
        model = ParamTree({{k: (tuple(t.shape), t.dtype) for k, t in sorted(vsd.items())}})
        for p in model.parameters():
            p.data.fill_(1)  # touched: the peak is the load's, not the model's
        largest = max(e.nbytes for e in vsd.plan.entries.values())
        with PeakRSS(sample_s=None) as peak:
            model.load_state_dict(vsd)
        pf = vsd.reader._prefetcher
        torch.save(model.state_dict(), {str(tmp_path / "got.pt")!r})
        slots = None if pf is None else (pf._limit, pf._most, prefetch.SLOTS)
        print(json.dumps({{"extra": peak.total, "largest": largest, "slots": slots}}))
        """
    )
    got = run_fresh("-c", script)
    assert "error" not in got, got
    assert got["extra"] <= 1.25 * got["largest"] + 64 * MiB, got
    if got["slots"] is not None:  # None: this filesystem refuses O_DIRECT, nothing is read ahead
        held, most, base = got["slots"]
        # 1.25x the 64 MiB value + 64 MiB, less the 32 MiB of staging, in 8 MiB slots.
        assert most == (80 + 64 - 32) // 8 and held == most > base, got
    state = torch.load(tmp_path / "got.pt")
    assert state.keys() == eager.keys() and all(torch.equal(state[k], eager[k]) for k in eager)


def test_mmap_assign_maps_unchanged_tensors_and_converts_the_rest(tmp_path: Path, monkeypatch) -> None:
    """mmap=True: unchanged tensors are copy-on-write file views, converted ones are read; same values."""
    import lazysd.reads
    from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint

    # Rows (experts) of any size are read one by one straight into place, not only >= 64 KiB.
    monkeypatch.setattr(lazysd.reads, "DIRECT_ROW", 0)
    spec = Step3p5Spec.tiny()
    path = make_checkpoint(tmp_path / "c", spec, layout="sharded")
    expected = {k: v.materialize() for k, v in VirtualStateDict(path).items()}
    vsd = VirtualStateDict(path, mmap=True)
    model = Step3p5Model(spec, layout="native", device="meta")
    model.load_state_dict(vsd, assign=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # Only concatenated or cast tensors were read; the rest are views not read yet (a
    # transposed down_projs is a strided view of its HF tensor).
    built = {k for k in vsd if len(vsd.entry(k).sources) > 1 or vsd.entry(k).dtype != vsd.entry(k).source_dtype}
    assert built and any(k.endswith("down_projs") for k in vsd if k not in built)
    assert vsd.bytes_read == sum(vsd.entry(k).nbytes for k in built)
    down = next(k for k in vsd if k.endswith("down_projs"))
    assert not state[down].is_contiguous() and torch.equal(state[down], expected[down])
    # gate_and_up_projs keeps the HF memory order ([E, 2I, D] seen as [E, D, 2I]): read
    # straight into place, no transpose, no staging.
    gate_up = next(k for k in vsd if k.endswith("gate_and_up_projs"))
    E, D, I2 = state[gate_up].shape
    assert state[gate_up].stride() == (I2 * D, 1, D)
    assert vsd.stats.staging_peak == 0
    # Training works on such parameters: gradients and optimizer state take their layout.
    model.float()  # (the tiny model computes in fp32)
    params = [p for p in model.parameters() if p.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, spec.vocab_size, (2, 5))
    model(ids).float().square().mean().backward()
    opt.step()
    assert all(p.grad is None or p.grad.stride() == p.stride() for p in params)
    # Training writes land in private pages, never in the checkpoint file.
    key = "model.embed_tokens.weight"
    before = (path / vsd.entry(key).sources[0].info.file.name).read_bytes()
    with torch.no_grad():
        dict(model.named_parameters())[key].add_(1)
    assert (path / vsd.entry(key).sources[0].info.file.name).read_bytes() == before
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())
