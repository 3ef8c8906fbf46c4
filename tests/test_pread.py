"""The fast paths of a load and their portable fallbacks: direct reads of cold bytes, bulk
pre-faulting of fresh destinations, and read defaults chosen from the machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from lazysd import VirtualStateDict, memory, pread, tuning
from lazysd.geometry import box_shape
from lazysd.pread import RangeReader
from lazysd.reader import ReadOptions
from lazysd.testing import (
    Step3p5Model,
    Step3p5Spec,
    load_hf_tensors,
    make_checkpoint,
    native_state_dict,
)
from tests.support.checks import assert_bitwise_equal
from tests.support.pagecache import evict, resident_map, resident_pages

MiB = 1 << 20
# Expert tensors of 8 MiB ([16, 512, 512] bf16): bulk reads, above pread.DIRECT_MIN.
SPEC = Step3p5Spec.tiny(moe_num_experts=16, moe_intermediate_size=512, hidden_size=512)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), SPEC, layout="sharded", shard_bytes=16 * MiB)


@pytest.fixture(scope="module")
def expected(ckpt: Path) -> dict[str, torch.Tensor]:
    # Cloned: views of safetensors' file mappings would keep the pages from being evicted.
    return {k: v.clone() for k, v in native_state_dict(load_hf_tensors(ckpt), SPEC.num_hidden_layers).items()}


def _evict_all(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        evict(f)
    if any(resident_pages(f) > 1 for f in files):
        pytest.skip("this filesystem does not honour page-cache eviction")
    return files


# ---- RangeReader -------------------------------------------------------------------------
@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    data = (
        torch.randint(0, 256, (9 * MiB + 123,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        .numpy()
        .tobytes()
    )
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    ("pos", "n"), [(0, 9 * MiB + 123), (4097, 5 * MiB + 3), (7, 100), (9 * MiB, 123), (9 * MiB - 5, 4096)]
)
def test_range_reader_reads_exact_bytes_cold_and_warm(blob, direct: bool, pos: int, n: int) -> None:
    path, data = blob
    fd = os.open(path, os.O_RDONLY)
    reader = RangeReader(fd, direct=direct)
    try:
        for _ in range(2):  # cold (evicted), then warm
            evict(path)
            out = bytearray(n)
            got = reader.read(memoryview(out), pos)
            want = data[pos : pos + n]
            assert got == len(want) and bytes(out[:got]) == want
    finally:
        reader.close()
        os.close(fd)


def test_range_reader_short_at_end_of_file(blob) -> None:
    path, data = blob
    fd = os.open(path, os.O_RDONLY)
    reader = RangeReader(fd)
    try:
        evict(path)
        out = bytearray(6 * MiB)
        assert reader.read(memoryview(out), len(data) - 5 * MiB) == 5 * MiB
        assert bytes(out[: 5 * MiB]) == data[-5 * MiB :]
        assert reader.read(memoryview(out), len(data)) == 0
    finally:
        reader.close()
        os.close(fd)


def _cold_reader(path: Path) -> tuple[int, RangeReader]:
    """A descriptor of ``path`` (readahead off, as the checkpoint opens files) and its
    RangeReader, the file evicted; skips where eviction is not honoured."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    evict(path)
    if resident_pages(path):
        os.close(fd)
        pytest.skip("this filesystem does not honour page-cache eviction")
    return fd, RangeReader(fd)


def test_cold_bulk_reads_go_direct_and_leave_the_page_cache_alone(blob) -> None:
    path, data = blob
    fd, reader = _cold_reader(path)
    try:
        out = bytearray(8 * MiB)
        assert reader.read(memoryview(out), 0) == 8 * MiB and bytes(out) == data[: 8 * MiB]
        if reader._direct_fd is None:
            pytest.skip("this filesystem refuses O_DIRECT: the buffered fallback was used (checked above)")
        assert reader.direct_bytes == 8 * MiB
        # Read straight from storage, but for the two pages the cache probes touched: an RWF_NOWAIT
        # miss returns EAGAIN and also starts the kernel reading that page, which may land any time.
        assert resident_pages(path) <= 2
        evict(path)  # so the probe below sees a cold range, not the pages its earlier probes pulled in
        assert reader.cached(0, 8 * MiB) is False
        # Warm bytes come from the page cache, never again from storage.
        with open(path, "rb") as fh:
            fh.read()
        before = reader.direct_bytes
        assert reader.cached(0, 8 * MiB) is True
        assert reader.read(memoryview(out), 0) == 8 * MiB and bytes(out) == data[: 8 * MiB]
        assert reader.direct_bytes == before
    finally:
        reader.close()
        os.close(fd)


def test_buffered_fallback_when_direct_io_is_refused(blob, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that rejects O_DIRECT requests (EINVAL) falls back to pread, same bytes."""
    path, data = blob
    real = os.preadv

    def refusing(fd, buffers, offset, flags=0):
        if fd == reader._direct_fd:
            raise OSError(22, "Invalid argument")
        return real(fd, buffers, offset, flags)

    fd = os.open(path, os.O_RDONLY)
    reader = RangeReader(fd)
    monkeypatch.setattr(pread.os, "preadv", refusing)
    try:
        evict(path)
        out = bytearray(8 * MiB)
        assert reader.read(memoryview(out), 100) == 8 * MiB and bytes(out) == data[100 : 100 + 8 * MiB]
        assert reader.direct_bytes == 0 and reader._direct_ok is False
    finally:
        reader.close()
        os.close(fd)


# ---- whole loads: fast paths and fallbacks give the same bits ------------------------------
@pytest.mark.parametrize("direct", [True, False])
def test_cold_load_is_bitwise_equal_and_reads_each_byte_once(ckpt, expected, direct: bool) -> None:
    _evict_all(ckpt)
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(ckpt, direct=direct) as vsd:
        model.load_state_dict(vsd)
        assert vsd.bytes_read == sum(s.info.nbytes for e in vsd.plan.entries.values() for s in e.sources)
        direct_bytes = sum(r.direct_bytes for r in vsd.checkpoint._readers.values())
    assert_bitwise_equal(model.state_dict(), expected)
    if direct and any(r._direct_fd is not None for r in vsd.checkpoint._readers.values()):
        assert direct_bytes > 0  # the experts' bulk reads
    if not direct:
        assert direct_bytes == 0


@pytest.mark.parametrize("prefault", [True, False])
def test_assign_prefaults_fresh_memory_when_enabled(
    ckpt, expected, prefault: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []
    real = memory.populate
    monkeypatch.setattr(memory, "enabled", prefault)

    def counting(t: torch.Tensor) -> bool:
        calls.append(real(t))
        return calls[-1]

    monkeypatch.setattr("lazysd.reader.populate", counting)
    model = Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16, device="meta")
    with VirtualStateDict(ckpt) as vsd:
        model.load_state_dict(vsd, assign=True)
    assert_bitwise_equal(model.state_dict(), expected)
    assert calls  # every fresh tensor is offered
    if prefault and memory.supported:
        assert any(calls)  # the large destinations were mapped in bulk
    if not prefault:
        assert not any(calls)  # the default: pages fault during the reads
    # Copying into allocated parameters never pre-faults (their memory is in use already).
    calls.clear()
    with VirtualStateDict(ckpt) as vsd:
        Step3p5Model(SPEC, layout="native", dtype=torch.bfloat16).load_state_dict(vsd)
    assert calls == []


def test_populate_maps_pages_and_keeps_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    t = torch.arange(1 << 20, dtype=torch.int32)
    want = t.clone()
    assert memory.populate(t) is False  # off by default
    monkeypatch.setattr(memory, "enabled", True)
    done = memory.populate(t)
    assert done == memory.supported
    assert torch.equal(t, want)
    assert memory.populate(torch.empty(10)) is False  # below MIN_BYTES: not worth a call
    assert memory.populate(torch.empty(0)) is False
    view = torch.empty(64, 1 << 14)[:, :8]  # strided: its span, from first to last element
    assert memory.span(view) == (view.data_ptr(), ((63 << 14) + 8) * 4)


# ---- self-tuning defaults ----------------------------------------------------------------
def test_default_threads_follow_the_affinity_mask(ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    cores = len(os.sched_getaffinity(0))
    assert tuning.cores() == cores
    with VirtualStateDict(ckpt) as vsd:
        assert vsd.reader.options.threads == min(cores, max(2, torch.get_num_threads()))
        assert vsd.reader.options.chunk_bytes == 8 * MiB
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(tuning.torch, "get_num_threads", lambda: 64)
    assert tuning.default_threads(ckpt) == 3
    monkeypatch.setattr(tuning.torch, "get_num_threads", lambda: 1)  # torchrun's OMP_NUM_THREADS=1
    assert tuning.default_threads(ckpt) == 2  # one thread reads while another copies
    monkeypatch.setattr(tuning.os, "sched_getaffinity", lambda pid: {0})
    assert tuning.default_threads(ckpt) == 1
    # Explicit values always win.
    with VirtualStateDict(ckpt, threads=5, chunk_bytes=MiB) as vsd:
        assert (vsd.reader.options.threads, vsd.reader.options.chunk_bytes) == (5, MiB)
    assert ReadOptions(threads=0).resolved(str(ckpt)).threads == 0


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
server:/export /mnt/nfs nfs4 rw 0 0
s3fs /mnt/bucket fuse.s3fs rw 0 0
/dev/vdb /mnt/nfs/local\\040disk xfs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "fs", "kind"),
    [
        ("/home/u/ckpt", "ext4", "local"),
        ("/dev/shm/ckpt", "tmpfs", "memory"),
        ("/mnt/nfs/ckpt", "nfs4", "network"),
        ("/mnt/nfsx/ckpt", "ext4", "local"),  # a prefix of the name is not the mount
        ("/mnt/bucket/a/b", "fuse.s3fs", "network"),
        ("/mnt/nfs/local disk/ckpt", "xfs", "local"),  # the deepest mount wins; \\040 is a space
    ],
)
def test_storage_kind_from_the_mount_table(path: str, fs: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning.os.path, "realpath", lambda p: str(p))
    assert tuning.filesystem_type(path, mounts=MOUNTS) == fs
    monkeypatch.setattr(tuning, "filesystem_type", lambda p, mounts=None: fs)
    assert tuning.storage_kind(path) == kind
    threads, chunk = tuning.default_threads(path), tuning.default_chunk_bytes(path)
    if kind == "network":
        assert threads == min(32, 4 * tuning.cores()) and chunk == 16 * MiB
    else:
        assert threads == min(tuning.cores(), max(2, torch.get_num_threads())) and chunk == 8 * MiB


def test_unknown_mount_table_means_local(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tuning.filesystem_type("/x", mounts="") is None
    monkeypatch.setattr(tuning, "filesystem_type", lambda p, mounts=None: None)
    assert tuning.storage_kind("/x") == "local"


def test_cold_span_streams_its_middle_and_reads_no_page_outside(tmp_path: Path) -> None:
    """Readahead inside a span the caller reads in full, and not one page beyond it: the
    neighbours of an expert-parallel rank's range stay unread."""
    data = torch.randint(0, 256, (72 * MiB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "big.bin"
    path.write_bytes(data.numpy().tobytes())
    lo, hi = 5 * MiB + 123, 61 * MiB + 7
    fd, reader = _cold_reader(path)
    try:
        out = bytearray(hi - lo)
        view = memoryview(out)
        for at in range(lo, hi, 8 * MiB):  # in chunks, as the reader does
            n = min(8 * MiB, hi - at)
            assert reader.read(view[at - lo : at - lo + n], at, (lo, hi)) == n
        assert bytes(out) == data[lo:hi].numpy().tobytes()
        if reader._direct_fd is None:
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed (checked above)")
        assert reader.stream_bytes >= 32 * MiB  # the aligned middle, margin off the end
        time.sleep(0.2)  # any readahead still in flight lands
        cached = resident_map(path)
        page = pread.ALIGN
        assert not any(cached[: lo // page]) and not any(cached[-(-hi // page) :])
    finally:
        reader.close()
        os.close(fd)


def test_runs_a_few_bytes_apart_are_read_in_one_call(blob, monkeypatch: pytest.MonkeyPatch) -> None:
    """A column shard's rows (runs with sub-page gaps) take one preadv per group, same bytes;
    a gap holding a whole page starts a new group (that page is not read)."""
    path, data = blob
    page = pread.ALIGN
    runs = [(100 + 3000 * i, 1000) for i in range(700)]  # 2000-byte gaps: no whole page
    runs.append((runs[-1][0] + 3 * page, 500))  # a gap with whole pages in it
    groups = pread.gather_groups(runs)
    assert [len(g) for g in groups] == [pread.GATHER_MAX, 700 - pread.GATHER_MAX, 1]
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off, *a: calls.append(len(bufs)) or real(fd, bufs, off, *a))
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray(sum(n for _, n in runs))
        view, pos = memoryview(out), 0
        for group in groups:
            want = sum(n for _, n in group)
            assert pread.read_gathered(fd, view[pos : pos + want], group) == want
            pos += want
        assert bytes(out) == b"".join(data[o : o + n] for o, n in runs)
        assert len(calls) == 3
        # Past the end of the file: short, and exactly how far the file goes.
        tail = [(len(data) - 5000, 1000), (len(data) - 3000, 2000), (len(data) - 500, 1000)]
        out = bytearray(4000)
        assert pread.read_gathered(fd, memoryview(out), tail) == 3500
        assert bytes(out[:3500]) == data[-5000:-4000] + data[-3000:-1000] + data[-500:]
    finally:
        os.close(fd)


def _expert_spec(layers: int) -> Step3p5Spec:
    """Layers of 64 experts of 1 MiB per source (64 MiB sources: an EP-2 rank's half is a
    window to stream), everything else tiny."""
    return Step3p5Spec(
        num_hidden_layers=layers,
        first_dense_layers=1,
        num_nextn_predict_layers=0,
        moe_num_experts=64,
        moe_intermediate_size=512,
        hidden_size=1024,
        intermediate_size=64,
        share_expert_dim=64,
        vocab_size=64,
    )


def test_cold_expert_shards_stream_and_read_only_their_pages(tmp_path: Path) -> None:
    """An expert-parallel rank's experts (64 MiB sources, half of them: windows to stream)
    read cold: bitwise right, partly streamed, and not one page beyond the planned ranges."""
    from lazysd.dryrun import EPLayout

    spec = _expert_spec(layers=2)
    path = make_checkpoint(tmp_path / "ckpt", spec)
    keys = ["model.layers.1.moe.experts.gate_and_up_projs", "model.layers.1.moe.experts.down_projs"]
    # Cloned: views of safetensors' file mappings would keep the pages from being evicted.
    eager = {k: v.clone() for k, v in native_state_dict(load_hf_tensors(path), 2).items() if k in keys}
    files = _evict_all(path)
    with VirtualStateDict(path) as vsd:
        ranges = []
        for key in keys:
            entry = vsd.entry(key)
            box = EPLayout(2).box(entry, 1)
            got = vsd.lazy(entry, box).materialize()
            assert_bitwise_equal({key: got}, {key: eager[key][box[0][0] : box[0][1]]})
            ranges += [r for item in vsd.reader.plan(entry, box) for r in item.ranges()]
        readers = list(vsd.checkpoint._readers.values())
        if all(r._direct_fd is None for r in readers):
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed (bytes checked above)")
        assert sum(r.stream_bytes for r in readers) >= 16 * MiB
    _no_page_beyond(files, ranges)
    # The same through one pipeline (stretches may run on across the tensors): the same pages.
    _evict_all(path)
    with VirtualStateDict(path) as vsd:
        fills = []
        for key in keys:
            entry = vsd.entry(key)
            box = EPLayout(2).box(entry, 1)
            fills.append((entry, box, torch.empty([hi - lo for lo, hi in box], dtype=entry.dtype)))
        vsd.reader.fill_many(fills)
        for entry, box, dest in fills:
            assert_bitwise_equal({entry.key: dest}, {entry.key: eager[entry.key][box[0][0] : box[0][1]]})
    _no_page_beyond(files, ranges)


def test_cold_load_state_dict_streams_across_tensors(tmp_path: Path) -> None:
    """``load_state_dict(vsd)`` fills one tensor at a time, but every key is the
    VirtualStateDict's to read: a cold load streams on across tensor boundaries (kernel
    readahead), reading directly only near the end of each file's stretch instead of the end
    of every tensor; bitwise right, each byte read once, no page outside the plan."""
    spec = Step3p5Spec(
        num_hidden_layers=3,
        first_dense_layers=1,
        num_nextn_predict_layers=0,
        moe_num_experts=8,
        moe_intermediate_size=1024,
        hidden_size=1024,
        intermediate_size=64,
        share_expert_dim=64,
        vocab_size=64,
    )
    path = make_checkpoint(tmp_path / "ckpt", spec, layout="single")  # experts of 16 MiB, read in 4 MiB chunks
    eager = {k: v.clone() for k, v in native_state_dict(load_hf_tensors(path), 3).items()}
    files = _evict_all(path)
    model = Step3p5Model(spec, layout="native", dtype=torch.bfloat16)
    with VirtualStateDict(path) as vsd:
        ranges = vsd.planned_ranges()
        # What one tensor at a time would read directly: every bulk tensor, all of it (none
        # is long enough for a streamed middle on its own).
        sources = [s.info for e in vsd.plan.entries.values() for s in e.sources]
        bulk = sum(i.nbytes for i in sources if i.nbytes >= pread.DIRECT_MIN)
        model.load_state_dict(vsd)
        readers = list(vsd.checkpoint._readers.values())
        assert vsd.bytes_read == sum(n for _, _, n in ranges)
        streamed = all(r._direct_fd is not None for r in readers)
    assert_bitwise_equal(model.state_dict(), eager)
    if not streamed:
        pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed (bytes checked above)")
    margins = len(files) * (pread.STREAM_MARGIN + 2 * pread.STREAM_ALIGN)
    assert bulk > margins
    assert sum(r.direct_bytes for r in readers) <= margins
    _no_page_beyond(files, ranges)


def _no_page_beyond(files: list[Path], ranges: list[tuple[str, int, int]]) -> None:
    """No file has more pages cached than ``ranges`` touch (the header page aside)."""
    from tests.support.pagecache import pages_touched

    time.sleep(0.2)  # readahead still in flight lands
    for f in files:
        mine = [(o, n) for name, o, n in ranges if name == str(f)]
        header = 1 if not any(o < pread.ALIGN for o, _ in mine) else 0
        assert resident_pages(f) - header <= pages_touched(mine), f.name


# ---- read-ahead streams (lazysd.prefetch) -------------------------------------------------
def test_prefetcher_reads_its_windows_ahead_and_nothing_else(tmp_path: Path) -> None:
    """Streams read only inside their windows, from where the fills are, at most ``ahead``
    past them; consumed() lets them on; close() stops them."""
    from lazysd.prefetch import SEGMENT, Prefetcher

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(12 * SEGMENT))
    evict(path)
    if resident_pages(path):
        pytest.skip("this filesystem does not honour page-cache eviction")
    f = str(path)
    windows = [(f, SEGMENT // 2, 3 * SEGMENT), (f, 5 * SEGMENT, 11 * SEGMENT)]
    opened: list[int] = []

    def open_fd(file: str) -> int:  # as the reader opens them: readahead off, exact reads
        opened.append(fd := os.open(file, os.O_RDONLY))
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    p = Prefetcher(windows, open_fd, at=(f, SEGMENT), streams=3, ahead=2 * SEGMENT)
    deadline = time.monotonic() + 30
    while p.bytes_read < 2 * SEGMENT and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # From the segment the fills are in (the one starting at SEGMENT // 2), two segments.
    assert p.bytes_read == 2 * SEGMENT
    page = pread.ALIGN
    first = set(range(SEGMENT // 2 // page, (SEGMENT // 2 + 2 * SEGMENT) // page))
    resident = {i for i, c in enumerate(resident_map(path)) if c}
    # Those pages, and none outside (this VM's proactive reclaim may take back a few of
    # them before they are counted: see the end of this test).
    assert resident <= first and len(resident) >= 0.9 * len(first)
    p.consumed(f, 7 * SEGMENT)  # the fills jumped on: the streams skip what lies behind
    deadline = time.monotonic() + 30
    while p.bytes_read < 4 * SEGMENT and time.monotonic() < deadline:
        time.sleep(0.01)
    p.close()
    assert p.bytes_read == 4 * SEGMENT
    assert all(not t.is_alive() for t in p._threads)
    for fd in opened:  # every descriptor it opened is closed
        with pytest.raises(OSError):
            os.fstat(fd)
    time.sleep(0.2)
    resident = {i for i, c in enumerate(resident_map(path)) if c}
    second = set(range(7 * SEGMENT // page, 9 * SEGMENT // page))
    # The second window's pages are in, and not one page outside the two windows. (Machines
    # with proactive reclaim take back pages nobody touched, some of the first window's and
    # even a few just read: this build VM runs a DAMON pageout scheme.)
    assert len(resident & second) >= 0.9 * len(second)
    assert resident <= first | second


def test_prefetcher_streams_end_when_the_fills_stop(tmp_path: Path, monkeypatch) -> None:
    """A load left unfinished: streams waiting for the fills end after a while (their
    buffers and descriptors freed), without close(); if the fills do move on after all
    (a slow tensor, not a stop), streams start again."""
    from lazysd import prefetch

    monkeypatch.setattr(prefetch, "IDLE_S", 0.2)
    path = tmp_path / "blob"
    f = str(path)
    path.write_bytes(bytes(4 * prefetch.SEGMENT))
    open_fd = lambda f: os.open(f, os.O_RDONLY)  # noqa: E731
    p = prefetch.Prefetcher([(f, 0, 4 * prefetch.SEGMENT)], open_fd, streams=2, ahead=prefetch.SEGMENT)
    for t in p._threads:
        t.join(10)
    assert all(not t.is_alive() for t in p._threads)
    assert p.bytes_read == prefetch.SEGMENT  # the one segment it was allowed ahead
    p.consumed(f, 2 * prefetch.SEGMENT)  # behind the fills now: segment 1; ahead of them: 2
    deadline = time.monotonic() + 30
    while p.bytes_read < 2 * prefetch.SEGMENT and time.monotonic() < deadline:
        time.sleep(0.01)
    p.close()
    assert p.bytes_read == 2 * prefetch.SEGMENT
    assert all(not t.is_alive() for t in p._threads)


def test_prefetcher_survives_a_failing_stream(tmp_path: Path) -> None:
    from lazysd.prefetch import SEGMENT, Prefetcher

    def refuse(file: str) -> int:
        raise OSError(13, "permission denied")

    p = Prefetcher([(str(tmp_path / "x"), 0, 4 * SEGMENT)], refuse, streams=2)
    p.close()
    assert p.bytes_read == 0


def test_prefetcher_reads_in_the_order_the_fills_use_the_bytes(tmp_path: Path, monkeypatch) -> None:
    """Fills need not go in file order (an embedding stored last but loaded first; layer 10
    stored before layer 2): the streams read segments in the order of the ranks of their
    ``uses``, and where the fills are is placed in that order."""
    from lazysd import prefetch

    S = 4 << 20
    monkeypatch.setattr(prefetch, "SEGMENT", S)
    path = tmp_path / "blob"
    path.write_bytes(bytes(8 * S))
    f = str(path)
    uses = [(0, f, 6 * S + 100, S), (1, f, 0, 6 * S), (2, f, 0, 8 * S)]  # the tail first, then the rest
    open_fd = lambda f: os.open(f, os.O_RDONLY)  # noqa: E731
    p = prefetch.Prefetcher([(f, 0, 8 * S)], open_fd, at=(f, 6 * S + 100), uses=uses, streams=2, ahead=2 * S)
    assert [lo // S for _, lo, _ in p.segments] == [6, 7, 0, 1, 2, 3, 4, 5]

    def reaches(n: int) -> None:
        deadline = time.monotonic() + 30
        while p.bytes_read < n and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert p.bytes_read == n

    reaches(2 * S)  # the tail, where the fills start
    p.consumed(f, 0)  # back to the file's start: in fill order, on
    reaches(4 * S)
    p.consumed(f, 3 * S)  # the fills read segment 2 themselves: the streams go on from 3
    reaches(6 * S)
    p.consumed(f, 7 * S)  # behind the fills' place in fill order (read first): nothing moves
    time.sleep(0.1)
    assert p.bytes_read == 6 * S
    p.close()


def _tune(rate: dict[int, float], start: int = 4, epochs: int = 8, **kw) -> list[int]:
    from lazysd.prefetch import StreamTuner

    t = StreamTuner(start, **kw)
    return [t.observe(rate[t.streams]) for _ in range(epochs)]


def test_stream_tuner_climbs_while_a_stream_more_pays() -> None:
    # Storage that gives most with 7 streams: the tuner climbs there and holds it.
    rate = {n: min(n, 7) - 0.5 * max(0, n - 7) for n in range(1, 9)}
    assert _tune(rate) == [5, 6, 7, 8, 7, 7, 7, 7]


def test_stream_tuner_tries_fewer_when_more_does_not_pay() -> None:
    # A disk that thrashes with concurrency: best with 2.
    rate = {1: 1.0, 2: 1.5, 3: 1.2, 4: 1.0, 5: 0.9, 6: 0.8, 7: 0.7, 8: 0.6}
    assert _tune(rate) == [5, 3, 2, 1, 2, 2, 2, 2]


def test_stream_tuner_keeps_its_count_within_noise() -> None:
    # Steps that change the rate by less than GAIN are not taken.
    rate = {3: 0.97, 4: 1.0, 5: 1.05}
    assert _tune(rate, epochs=4) == [5, 3, 4, 4]


def test_stream_tuner_bounds_and_climbs_again_after_holding() -> None:
    # At the top already: one fewer is tried; at the bottom with nothing better: it stays.
    assert _tune({6: 1.5, 7: 2.0, 8: 1.0}, start=8, epochs=4) == [7, 6, 7, 7]
    assert _tune({1: 1.0, 2: 1.0}, start=1, epochs=3) == [2, 1, 1]
    # After holding `hold` epochs it measures again, so storage that got faster with
    # more streams (another job on it finished) is followed.
    rate = {3: 1.0, 4: 1.0, 5: 1.0}
    from lazysd.prefetch import StreamTuner

    t = StreamTuner(4, hold=3)
    seen = [t.observe(rate[t.streams]) for _ in range(5)]
    assert seen == [5, 3, 4, 4, 4]
    rate[5] = 2.0
    assert [t.observe(rate[t.streams]) for _ in range(2)] == [5, 6]


def test_prefetcher_runs_as_many_streams_as_its_tuner_says(tmp_path: Path, monkeypatch) -> None:
    """Each epoch's rate goes to the tuner, and the streams follow its count: more streams
    start, and those above a lowered count stop taking segments."""
    from lazysd import prefetch

    monkeypatch.setattr(prefetch, "SEGMENT", 4 << 20)  # many segments, a small file
    monkeypatch.setattr(prefetch, "EPOCH", 4 << 20)
    counts = iter([6, 6, 6, 6, 1])
    judged: list[float] = []

    def observe(self: prefetch.StreamTuner, rate: float) -> int:
        judged.append(rate)
        self.streams = next(counts, 1)
        return self.streams

    monkeypatch.setattr(prefetch.StreamTuner, "observe", observe)
    taken: list[tuple[int, int]] = []
    take = prefetch.Prefetcher._take

    def logged(self: prefetch.Prefetcher, slot: int):
        segment = take(self, slot)
        if segment is not None:
            taken.append((slot, len(judged)))
        return segment

    monkeypatch.setattr(prefetch.Prefetcher, "_take", logged)
    path = tmp_path / "blob"
    n = 24
    path.write_bytes(bytes(n * prefetch.SEGMENT))
    evict(path)  # epochs count bytes from storage, not the page cache
    if resident_pages(path):
        pytest.skip("this filesystem does not honour page-cache eviction")
    windows = [(str(path), 0, n * prefetch.SEGMENT)]
    p = prefetch.Prefetcher(windows, lambda f: os.open(f, os.O_RDONLY), streams=2, ahead=n * prefetch.SEGMENT)
    assert p.streams == 2
    deadline = time.monotonic() + 60
    while p.bytes_read < n * prefetch.SEGMENT and time.monotonic() < deadline:
        time.sleep(0.01)
    p.close()
    assert p.bytes_read == n * prefetch.SEGMENT and all(r > 0 for r in judged)
    assert {slot for slot, _ in taken} == set(range(6))  # four more started at the tuner's word
    # Once the count went down to 1 (fifth judgement), only slot 0 took new segments.
    assert {slot for slot, j in taken if j >= 5} <= {0}
    assert all(not t.is_alive() for t in p._threads)


def test_prefetcher_tells_the_tuner_only_bytes_from_storage(tmp_path: Path, monkeypatch) -> None:
    """Segments the page cache holds already (the fills' own reads got there first) are
    found without waiting and say nothing of the storage's rate."""
    from lazysd import prefetch

    if not prefetch._NOWAIT:
        pytest.skip("no RWF_NOWAIT here: every byte counts as read from storage")
    monkeypatch.setattr(prefetch, "SEGMENT", 4 << 20)
    monkeypatch.setattr(prefetch, "EPOCH", 4 << 20)
    judged: list[float] = []
    monkeypatch.setattr(prefetch.StreamTuner, "observe", lambda self, rate: judged.append(rate) or self.streams)
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * prefetch.SEGMENT))  # just written: cached
    p = prefetch.Prefetcher([(str(path), 0, 8 * prefetch.SEGMENT)], lambda f: os.open(f, os.O_RDONLY), streams=2)
    deadline = time.monotonic() + 30
    while p.bytes_read < 8 * prefetch.SEGMENT and time.monotonic() < deadline:
        time.sleep(0.01)
    p.close()
    assert p.bytes_read == 8 * prefetch.SEGMENT and judged == []


def test_prefetcher_judges_no_epoch_spent_waiting_for_the_fills(tmp_path: Path, monkeypatch) -> None:
    """An epoch in which a stream waited for the fills measured the fills, not the storage:
    the tuner is not told it. A later prefetcher on the same device starts where a tuning
    there settled."""
    from lazysd import prefetch

    monkeypatch.setattr(prefetch, "SEGMENT", 4 << 20)
    monkeypatch.setattr(prefetch, "EPOCH", 2 * prefetch.SEGMENT)
    judged: list[float] = []
    observe = prefetch.StreamTuner.observe
    monkeypatch.setattr(prefetch.StreamTuner, "observe", lambda self, rate: judged.append(rate) or observe(self, rate))
    path = tmp_path / "blob"
    path.write_bytes(bytes(4 * prefetch.SEGMENT))
    evict(path)  # epochs count bytes from storage, not the page cache
    if resident_pages(path):
        pytest.skip("this filesystem does not honour page-cache eviction")
    f = str(path)
    open_fd = lambda f: os.open(f, os.O_RDONLY)  # noqa: E731
    p = prefetch.Prefetcher([(f, 0, 4 * prefetch.SEGMENT)], open_fd, streams=1, ahead=prefetch.SEGMENT)
    for k in range(1, 5):  # the fills move on only after the stream waited for them
        deadline = time.monotonic() + 30
        while p.bytes_read < k * prefetch.SEGMENT and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        p.consumed(f, k * prefetch.SEGMENT)
    p.close()
    assert p.bytes_read == 4 * prefetch.SEGMENT and judged == []
    # Nothing settled here; where a tuning on this device settled, the next one starts there.
    device = os.stat(f).st_dev
    monkeypatch.setitem(prefetch._settled, device, 6)
    q = prefetch.Prefetcher([(f, 0, prefetch.SEGMENT)], open_fd)
    assert q.streams == 6
    q.close()


def test_cold_reads_of_own_boxes_read_ahead_only_those(tmp_path: Path) -> None:
    """A reader whose own values are one expert-parallel rank's boxes (as a VirtualStateDict
    on a mesh has): its first cold fill starts the read-ahead streams, which read the rank's
    stretches ahead, so later fills find their bytes cached; bitwise right, every byte
    counted once, and no page of another rank's experts is read."""
    from lazysd.dryrun import EPLayout

    spec = _expert_spec(layers=3)
    path = make_checkpoint(tmp_path / "ckpt", spec, layout="single")
    eager = {k: v.clone() for k, v in native_state_dict(load_hf_tensors(path), 3).items()}
    files = _evict_all(path)
    layout = EPLayout(2)
    with VirtualStateDict(path) as vsd:
        boxes = {key: layout.box(vsd.entry(key), 1) for key in vsd}
        vsd.reader.own = lambda: [(vsd.entry(k), b) for k, b in boxes.items()]
        ranges = [r for key, box in boxes.items() for r in vsd.reader.ranges(vsd.entry(key), box)]
        # In file order, as models list their parameters in the released checkpoints.
        order = sorted(boxes.items(), key=lambda kv: vsd.entry(kv[0]).sources[0].info.offset)
        for i, (key, box) in enumerate(order):
            got = torch.empty(box_shape(box), dtype=eager[key].dtype)
            vsd.reader.fill(vsd.entry(key), box, got)
            assert_bitwise_equal({key: got}, {key: eager[key][tuple(slice(lo, hi) for lo, hi in box)]})
            prefetcher = vsd.reader._prefetcher
            if i == 0 and prefetcher is not None:
                # Give the streams time to get ahead (on a busy machine the fills could
                # otherwise overtake them): the fills after this find their bytes cached.
                deadline = time.monotonic() + 30
                while prefetcher.bytes_read < 32 << 20 and time.monotonic() < deadline:
                    time.sleep(0.01)
        assert vsd.bytes_read == sum(n for _, _, n in ranges)
        if all(r._direct_fd is None for r in vsd.checkpoint._readers.values()):
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed (bytes checked above)")
        assert prefetcher is not None and prefetcher.bytes_read >= 32 << 20
    assert all(not t.is_alive() for t in prefetcher._threads)  # closed with the VirtualStateDict
    _no_page_beyond(files, ranges)


@pytest.mark.parametrize("how", ["load_state_dict", "lazysd.load"])
def test_a_cold_per_expert_load_reads_ahead_in_the_order_it_fills(tmp_path: Path, how: str, monkeypatch) -> None:
    """A Qwen3-MoE release stores ``lm_head`` last and ``layers.10`` before ``layers.2``,
    and the values are filled in another order (``lm_head`` is the first key): the streams
    read ahead in the values' order, so most of the checkpoint is read by them, not skipped
    as if the fills were past it; bitwise right. ``lazysd.load`` fills block after block in
    that order too, telling the streams where it is job by job."""
    import lazysd
    from lazysd import prefetch
    from lazysd.testing.families import FamilySpec, ParamTree, eager_native, make_family_checkpoint

    # Segments of 4 MiB, at most two ahead: the streams get on only as the fills tell them.
    monkeypatch.setattr(prefetch, "SEGMENT", 4 << 20)
    monkeypatch.setattr(prefetch, "AHEAD", 8 << 20)

    spec = FamilySpec(
        family="qwen3_moe",
        num_hidden_layers=12,
        first_dense=0,
        num_experts=8,
        hidden_size=512,
        moe_intermediate_size=256,
        vocab_size=32768,
    )
    path = make_family_checkpoint(tmp_path / "ckpt", spec)
    eager = eager_native(spec, {k: v.clone() for k, v in load_hf_tensors(path).items()})
    _evict_all(path)
    with VirtualStateDict(path) as vsd:
        assert next(iter(vsd)) == "lm_head.weight"
        model = ParamTree({k: (tuple(t.shape), t.dtype) for k, t in vsd.items()})
        if how == "lazysd.load":
            lazysd.load(model, vsd)
        else:
            model.load_state_dict(vsd)
        prefetcher = vsd.reader._prefetcher
        if prefetcher is None:
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed")
        windows = sum(hi - lo for _, lo, hi in prefetcher.segments)
    assert_bitwise_equal(dict(model.state_dict()), eager)
    # The fills overtake the streams now and then on a busy machine; skipping everything
    # behind the first key's bytes (the end of the last file), or not being told where the
    # fills of lazysd.load were, left them under a tenth of it.
    assert prefetcher.bytes_read >= windows // 3
