"""The transposed copy: compiled kernel and torch fallback, bitwise against torch's copy_."""

from __future__ import annotations

import math
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


# Every instruction set the kernel has on this machine ("scalar" and, on x86-64, "sse2" always;
# "avx2" and "avx512" where the CPU has them): each is checked against torch, bit for bit.
ISAS = tr._transpose.isas() if kernel_available() else ()
ITEM_DTYPES = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


@pytest.fixture
def isa(request):
    """Forces the kernel onto one instruction set for a test, and back to the default after."""
    default = tr._transpose.isa()
    tr._transpose.set_isa(request.param)
    try:
        yield request.param
    finally:
        tr._transpose.set_isa(default)


@pytest.fixture
def one_torch_thread():
    """torch's own checks on one thread: on a busy 2-core machine its thread pool's wake-ups
    took 20-50x the work of these small comparisons."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_the_default_isa_is_the_widest_available() -> None:
    if not kernel_available():
        pytest.skip("kernel not built")
    assert ISAS[0] == "scalar" and tr._transpose.isa() == ISAS[-1] == tr.kernel_isa()
    assert set(ISAS) <= {"scalar", "sse2", "avx2", "avx512"}
    with pytest.raises(ValueError, match=r"instruction set 'avx1024' is not available here \(available: \("):
        tr._transpose.set_isa("avx1024")
    assert tr._transpose.isa() == ISAS[-1]


def _dest_layouts(shape: tuple[int, ...], dtype: torch.dtype):
    """(name, base, dest): destinations of ``shape`` with contiguous rows, each a view into a
    base filled with 0x5A bytes: dense; the column half of a wider tensor (as gate_and_up_projs
    halves are); shifted by one element with rows a whole number of cache lines apart (the
    kernel aligns its stores first); and rows an odd number of elements apart."""
    *outer, rows, cols = shape
    line = 64 // torch.empty((), dtype=dtype).element_size()
    for name, width, start in [
        ("dense", cols, 0),
        ("half", 2 * cols, cols),
        ("shifted", -(-(cols + 1) // line) * line, 1),
        ("odd stride", cols + 3, 2),
    ]:
        base = torch.full((*outer, rows, width * torch.empty((), dtype=dtype).element_size()), 0x5A, dtype=torch.uint8)
        base = base.view(dtype)
        yield name, base, base[..., start : start + cols]


def _outside_is_untouched(base: torch.Tensor, dest: torch.Tensor) -> bool:
    """Every element of ``base`` outside its view ``dest`` still holds the 0x5A fill."""
    inside = torch.zeros(base.numel(), dtype=torch.bool)
    inside.as_strided(dest.shape, dest.stride(), dest.storage_offset() - base.storage_offset()).fill_(True)
    return bool((base.reshape(-1)[~inside].view(torch.uint8) == 0x5A).all())


# Destination shapes [.., rows, cols]: tiny and one-sided, ragged against the 8/16/32/64-element
# blocks, several 256 x 256 tiles, batch dims, and dims before the batch.
SHAPES = [
    (1, 1), (1, 37), (37, 1), (7, 9), (8, 8), (16, 64), (31, 33), (32, 32), (33, 65), (64, 128),
    (70, 200), (260, 300), (3, 40, 70), (2, 3, 33, 17),
]


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_every_isa_transposes_bitwise(isa: str, itemsize: int, one_torch_thread) -> None:
    dtype = ITEM_DTYPES[itemsize]
    for shape in SHAPES:
        *outer, rows, cols = shape
        for shift in (0, 1):  # sources at an aligned address and one element past it
            flat = _random((math.prod(shape) + shift,), dtype)
            src = flat[shift:].view(*outer, cols, rows).transpose(-1, -2)
            for (name, base, dest), threads in zip(_dest_layouts(shape, dtype), [1, 3, 2, 1]):
                copy_into(dest, src, threads=threads)  # small copies split across threads too
                case = f"{isa} {dtype} {shape} {name} source shift {shift}"
                assert same_bits(dest, src), case
                assert _outside_is_untouched(base, dest), case


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_every_isa_reads_transposed_from_a_file(tmp_path, isa: str, itemsize: int, one_torch_thread) -> None:
    # The file holds [.., cols, rows] at an odd offset. (2, 300, 600): two read blocks per
    # batch and a short last one for every item size; (1, 1) and (9, 2100): one row or one column.
    dtype = ITEM_DTYPES[itemsize]
    path = tmp_path / "blob"
    for shape in [(2, 5, 300), (3, 70, 90), (2, 300, 600), (1, 1), (9, 2100), (2100, 9)]:
        src = _random(shape, dtype)
        nbytes = src.numel() * itemsize
        path.write_bytes(b"x" * 17 + tensor_bytes(src) + b"tail")
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, base, dest in _dest_layouts((*shape[:-2], shape[-1], shape[-2]), dtype):
                case = f"{isa} {dtype} {shape} {name}"
                assert tr.read_transposed(fd, 17, dest) == nbytes, case
                assert same_bits(dest, src.transpose(-1, -2)), case
                assert _outside_is_untouched(base, dest), case
            # A file that ends early: the count says how far it went (the caller raises
            # FileChangedError); what is returned is what the file had.
            os.truncate(path, 17 + nbytes // 2)
            assert tr.read_transposed(fd, 17, dest) == nbytes // 2, shape
        finally:
            os.close(fd)
    with pytest.raises(OSError):
        tr.read_transposed(fd, 17, dest)  # closed descriptor: EBADF, not a crash


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_copy_transposed_writes_what_read_transposed_does(itemsize: int) -> None:
    """From memory instead of a file (a read-ahead slot): the same destinations, the same
    bits, nothing outside the destination touched."""
    dtype = ITEM_DTYPES[itemsize]
    for shape in [(2, 5, 300), (3, 70, 90), (2, 300, 600), (1, 1), (9, 2100), (2100, 9)]:
        src = _random(shape, dtype)
        for name, base, dest in _dest_layouts((*shape[:-2], shape[-1], shape[-2]), dtype):
            tr.copy_transposed(src.data_ptr(), dest)
            assert same_bits(dest, src.transpose(-1, -2)), f"{dtype} {shape} {name}"
            assert _outside_is_untouched(base, dest), f"{dtype} {shape} {name}"


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
def test_fused_and_staged_loads_agree_bitwise(tmp_path, monkeypatch) -> None:
    from lazysd import VirtualStateDict
    from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint

    spec = Step3p5Spec.tiny(moe_num_experts=6, moe_intermediate_size=40, hidden_size=72)
    path = make_checkpoint(tmp_path, spec, layout="split")
    import lazysd.reader

    calls = []
    monkeypatch.setattr(lazysd.reader, "read_transposed", lambda *a: calls.append(a) or tr.read_transposed(*a))

    def read_many(jobs, threads, *, probe):  # noqa: ANN001, ANN202
        calls.extend(job for job in jobs if len(job) == 9)  # the transposing ones
        return tr.read_many(jobs, threads, probe=probe)

    monkeypatch.setattr(lazysd.reader, "read_many", read_many)
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


# ---- read_many: batched reads of cached bytes ---------------------------------------------
def _blob(path, nbytes: int, *, at: int = 17) -> bytes:
    data = _random((nbytes,), torch.uint8).numpy().tobytes()
    path.write_bytes(b"x" * at + data + b"tail")
    return data


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_read_many_plain_and_transposed_jobs_bitwise(tmp_path, threads: int) -> None:
    """Plain reads of every size class (units of 256 KiB to 4 MiB: ragged last units) and
    transposing reads into dense and half-width destinations, in one call, on 1-5 threads."""
    src = _random((3, 300, 600), torch.bfloat16)  # the file's [batch, cols, rows]
    sizes = [0, 1, 4095, 300_001, 3 << 20, (9 << 20) + 7]
    path = tmp_path / "blob"
    data = _blob(path, src.numel() * 2 + sum(sizes))
    src_at = 17 + sum(sizes)
    path.write_bytes(path.read_bytes()[:src_at] + tensor_bytes(src) + b"tail")
    fd = os.open(path, os.O_RDONLY)
    try:
        outs = [torch.full((n,), 0x5A, dtype=torch.uint8) for n in sizes]
        dense = torch.empty(3, 600, 300, dtype=torch.bfloat16)
        wide = torch.full((3, 600, 700), 7, dtype=torch.bfloat16)
        half = wide[:, :, 400:]
        jobs, at = [], 17
        for out in outs:
            jobs.append(tr.read_job(fd, at, out, transposed=False))
            at += out.numel()
        jobs += [tr.read_job(fd, src_at, d, transposed=True) for d in (dense, half)]
        got = tr.read_many(jobs, threads, probe=True)
        assert got == [*sizes, src.numel() * 2, src.numel() * 2]
        at = 0
        for out in outs:
            assert out.numpy().tobytes() == data[at : at + out.numel()]
            at += out.numel()
        assert same_bits(dense, src.transpose(-1, -2)) and same_bits(half, src.transpose(-1, -2))
        assert bool((wide[:, :, :400] == 7).all())
        # Alone in a call: no bytes at all, and sizes cut into units of about total / threads.
        for n in (0, 1, (11 << 18) + 5, 3 << 20):
            out = torch.full((n,), 0x5A, dtype=torch.uint8)
            assert tr.read_many([tr.read_job(fd, 17, out, transposed=False)], threads, probe=True) == [n]
            assert out.numpy().tobytes() == data[:n]
    finally:
        os.close(fd)


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
def test_read_many_reports_short_and_failed_jobs(tmp_path) -> None:
    """A job past the end of the file comes back short, one on a bad descriptor as -errno,
    a malformed one raises; the others of the call are read all the same."""
    import errno

    path = tmp_path / "blob"
    data = _blob(path, 1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        good = torch.empty(1 << 20, dtype=torch.uint8)
        past = torch.empty(1 << 20, dtype=torch.uint8)
        bad = torch.empty(4096, dtype=torch.uint8)
        got = tr.read_many(
            [
                tr.read_job(fd, 17, good, transposed=False),
                tr.read_job(fd, 1 << 19, past, transposed=False),
                tr.read_job(1 << 20, 0, bad, transposed=False),  # not an open descriptor
            ],
            2,
            probe=False,
        )
        assert got[0] == 1 << 20 and good.numpy().tobytes() == data
        assert 0 <= got[1] < 1 << 20
        assert got[2] == -errno.EBADF
        # A transposing job whose second expert runs past the end: short, first expert right.
        experts = torch.empty(2, 512, 512, dtype=torch.bfloat16)
        (got,) = tr.read_many([tr.read_job(fd, 17 + (1 << 19), experts, transposed=True)], 2, probe=False)
        assert 0 <= got < experts.numel() * 2
        first = torch.frombuffer(bytearray(data[1 << 19 : (1 << 19) + (1 << 19)]), dtype=torch.bfloat16)
        assert same_bits(experts[0], first.view(512, 512).t())
        with pytest.raises(TypeError):
            tr.read_many([(fd, 0, good.data_ptr())], 1, probe=False)
        with pytest.raises(ValueError):
            tr.read_many([(fd, -1, good.data_ptr(), 10)], 1, probe=False)
        with pytest.raises(ValueError):
            tr.read_job(fd, 0, torch.empty(4, 4).t(), transposed=False)  # not contiguous
        assert tr.read_many([], 2, probe=True) == []
    finally:
        os.close(fd)


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
def test_read_many_leaves_cold_jobs_unread_and_probes_no_further(tmp_path) -> None:
    """probe: from the first job whose bytes are not cached on, nothing is read (-EAGAIN);
    only that job's first page is touched by the probe."""
    import errno

    from tests.support.pagecache import evict, resident_map

    path = tmp_path / "blob"
    _blob(path, 8 << 20, at=0)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        evict(path)
        if any(resident_map(path)):
            pytest.skip("this filesystem does not honour page-cache eviction")
        os.pread(fd, 4 << 20, 0)  # the first half cached
        outs = [torch.empty(1 << 20, dtype=torch.uint8) for _ in range(8)]
        jobs = [tr.read_job(fd, i << 20, out, transposed=False) for i, out in enumerate(outs)]
        got = tr.read_many(jobs, 2, probe=True)
        assert got == [1 << 20] * 4 + [-errno.EAGAIN] * 4
        cached = [i for i, c in enumerate(resident_map(path)) if c]
        assert cached == list(range(1024)) + [1024] or cached == list(range(1024)), cached[1020:]
    finally:
        os.close(fd)


@pytest.mark.skipif(not kernel_available(), reason="kernel not built")
def test_read_many_from_several_threads_and_after_fork(tmp_path) -> None:
    """Callers on several Python threads at once (one runs on the kept workers, the others
    on threads of their own), and a forked child (which has none of the parent's workers)."""
    import multiprocessing
    import threading

    path = tmp_path / "blob"
    data = _blob(path, 16 << 20)
    fd = os.open(path, os.O_RDONLY)
    errors: list[str] = []

    def read_all(k: int) -> None:
        for _ in range(20):
            out = torch.empty(16 << 20, dtype=torch.uint8)
            if tr.read_many([tr.read_job(fd, 17, out, transposed=False)], 2 + k % 2, probe=False) != [16 << 20]:
                errors.append(f"thread {k}: short")
            elif out.numpy().tobytes() != data:
                errors.append(f"thread {k}: wrong bytes")

    try:
        threads = [threading.Thread(target=read_all, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        def in_child() -> None:
            read_all(0)
            if errors:
                raise SystemExit(f"child: {errors}")

        child = multiprocessing.get_context("fork").Process(target=in_child)
        child.start()
        child.join(60)
        assert child.exitcode == 0 and not errors
    finally:
        os.close(fd)
