"""The transposed copy: compiled kernel and torch fallback, bitwise against torch's copy_."""

from __future__ import annotations

import os

import pytest
import torch

import lazysd.transpose as tr
from lazysd.transpose import copy_into, kernel_available
from tests.support.checks import same_bits, tensor_bytes


def _random(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8).view(dtype).view(shape)


def test_kernel_is_built() -> None:
    # The install compiles lazysd/_transpose.c; without it loads fall back to torch (slower).
    assert kernel_available(), "lazysd/_transpose.c was not compiled (no C compiler at install time?)"


DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.uint8, torch.float8_e4m3fn, torch.bool]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 5), (8, 8), (9, 17), (257, 300), (4, 64, 40), (3, 513, 7), (2, 3, 20, 12)],
    ids=str,
)
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_transposed_copy_is_bitwise(dtype: torch.dtype, shape: tuple[int, ...], kernel: bool, monkeypatch) -> None:
    if not kernel:
        monkeypatch.setattr(tr, "_transpose", None)
    if dtype is torch.bool:
        src = torch.randint(0, 2, (*shape[:-2], shape[-1], shape[-2])).bool()
    else:
        src = _random((*shape[:-2], shape[-1], shape[-2]), dtype)
    dest = torch.empty(shape, dtype=dtype)
    copy_into(dest, src.transpose(-1, -2))
    assert same_bits(dest, src.transpose(-1, -2))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_halves_of_a_wider_destination_across_threads(threads: int) -> None:
    # The gate_and_up case: two [E, I, D] sources into the column halves of one [E, D, 2I],
    # large enough to be split over threads; the other half and the margins stay untouched.
    E, I, D = 3, 700, 1100
    gate, up = _random((E, I, D), torch.bfloat16), _random((E, I, D), torch.bfloat16)
    dest = torch.zeros(E, D, 2 * I + 5, dtype=torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        copy_into(dest[:, :, :I], gate.transpose(1, 2))
        copy_into(dest[:, :, I : 2 * I], up.transpose(1, 2))
    finally:
        torch.set_num_threads(old)
    assert same_bits(dest[:, :, : 2 * I], torch.cat([gate.mT, up.mT], -1))
    assert not dest[:, :, 2 * I :].view(torch.int16).any()


def test_permuted_sources_and_non_transposes_take_the_right_path() -> None:
    src = _random((4, 6, 10), torch.float32)
    for perm in [(0, 2, 1), (2, 1, 0), (1, 2, 0), (0, 1, 2)]:
        moved = src.permute(perm)
        dest = torch.empty(moved.shape, dtype=torch.float32)
        copy_into(dest, moved)
        assert same_bits(dest, moved)
    # A cast on the way (FP8 dequantization stages fp32 for a bf16 parameter) goes through torch.
    src = torch.randn(4, 6, 10)
    dest = torch.empty(4, 10, 6, dtype=torch.bfloat16)
    copy_into(dest, src.transpose(1, 2))
    assert torch.equal(dest, src.transpose(1, 2).to(torch.bfloat16))


def test_the_kernel_reports_a_bad_itemsize() -> None:
    if not kernel_available():
        pytest.skip("kernel not built")
    with pytest.raises(ValueError, match="itemsize 3 is not 1, 2, 4 or 8"):
        tr._transpose.copy(0, 0, 1, 1, 1, 0, 1, 0, 1, 3, 1)


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
@pytest.mark.parametrize("shape", [(2, 5, 300), (3, 700, 90), (1, 1), (9, 2100)], ids=str)
def test_read_transposed_from_a_file(tmp_path, shape: tuple[int, ...]) -> None:
    # The file holds [.., cols, rows] at an odd offset; the destination is a column slice of
    # a wider tensor, as a gate or up half of gate_and_up_projs is.
    src = _random(shape, torch.bfloat16)
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 17 + tensor_bytes(src) + b"tail")
    wide = torch.zeros(*shape[:-2], shape[-1], shape[-2] + 3, dtype=torch.bfloat16)
    dest = wide[..., 1 : shape[-2] + 1]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert tr.read_transposed(fd, 17, dest) == src.numel() * 2
        assert same_bits(dest, src.transpose(-1, -2))
        assert not wide[..., 0].view(torch.int16).any() and not wide[..., -2:].view(torch.int16).any()
        # A file that ends early: the count says so (the caller raises FileChangedError).
        os.truncate(path, 17 + src.numel())
        assert tr.read_transposed(fd, 17, dest) < src.numel() * 2
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        tr.read_transposed(fd, 17, dest)  # closed descriptor: EBADF, not a crash


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
def test_fused_and_staged_loads_agree_bitwise(tmp_path, monkeypatch) -> None:
    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint

    spec = Step3p5Spec.tiny(moe_num_experts=6, moe_intermediate_size=40, hidden_size=72)
    path = make_checkpoint(tmp_path, spec, layout="split")
    import lazysd.reader

    calls = []
    monkeypatch.setattr(lazysd.reader, "read_transposed", lambda *a: calls.append(a) or tr.read_transposed(*a))
    states = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(tr, "_transpose", None)
        model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16)
        with VirtualStateDict(path, chunk_bytes=4096) as vsd:
            model.load_state_dict(vsd)
            assert vsd.stats.staging_peak <= vsd.reader.options.max_inflight_bytes
        states.append(model.state_dict())
        # Every expert chunk (gate, up, down of every MoE layer) took the fused read, or none.
        assert (len(calls) >= 3 * spec.moe_num_experts) if kernel else not calls
        calls.clear()
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert same_bits(states[0][k], states[1][k]), k
