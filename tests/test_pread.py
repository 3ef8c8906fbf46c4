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
from lazysd.reader import ReadOptions, _fill_group
from lazysd.testing import (
    Step3p5Model,
    Step3p5Spec,
    load_hf_tensors,
    make_checkpoint,
    native_state_dict,
)
from tests.support.checks import assert_bitwise_equal
from tests.support.pagecache import evict, resident_pages

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


def _cold_qwen3_moe(tmp_path: Path, **dims: int) -> tuple[Path, dict, list[Path]]:
    """A Qwen3-MoE release of ``dims`` (every layer MoE), the values a plain eager load
    gives (clones: mapped pages would stay cached), and its files, evicted."""
    from lazysd.testing.families import FamilySpec, eager_native, make_family_checkpoint

    spec = FamilySpec(family="qwen3_moe", first_dense=0, **dims)
    path = make_family_checkpoint(tmp_path / "ckpt", spec)
    eager = eager_native(spec, {k: v.clone() for k, v in load_hf_tensors(path).items()})
    return path, eager, _evict_all(path)


def _pages_bytes(ranges: list[tuple[str, int, int]], files: list[Path]) -> int:
    """The bytes of the whole pages ``ranges`` touch in ``files``: what a load that reads
    each byte once reads from storage."""
    from tests.support.pagecache import page_set

    return pread.ALIGN * sum(len(page_set([(o, n) for f, o, n in ranges if f == str(file)])) for file in files)


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
        # Read straight from storage (but for the two pages the cache probes touched where the
        # system has no cachestat: an RWF_NOWAIT miss starts the kernel reading that page).
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


def test_probes_ask_the_pages_inside_a_range_and_read_nothing(blob) -> None:
    """Whether a range is cached is asked of the pages wholly inside it (a page it shares
    with a neighbour may be cached by the neighbour's read); counting them with cachestat
    reads nothing, so a cold range stays cold for the next probe."""
    path, _ = blob
    page = pread.ALIGN
    assert pread.probe_points(100, 3 * page) == (page, 2 * page)
    assert pread.probe_points(page, 2 * page) == (page, 2 * page)
    assert pread.probe_points(100, 50) == (100, 149)  # no whole page inside: its ends
    fd, reader = _cold_reader(path)
    try:
        if pread.page_cached(fd, 0, page) is None:
            pytest.skip("no cachestat here (Linux before 6.5): probes are RWF_NOWAIT reads")
        os.pread(fd, 1, 2 * MiB - 1)  # the neighbour's page: cached by reading its last byte
        # The range's first page is the cached one, but it is only partly the range's.
        assert reader.cached(2 * MiB - 100, 4 * MiB) is False
        assert pread.page_cached(fd, 2 * MiB - 100, 4 * MiB) is False
        assert resident_pages(path) == 1  # asking read nothing
        os.pread(fd, 2 * MiB + 100, 2 * MiB)  # more than half of the range's own pages
        assert reader.cached(2 * MiB - 100, 4 * MiB) is True
    finally:
        reader.close()
        os.close(fd)


def test_huge_buffers_start_on_a_huge_page_boundary() -> None:
    """Bounce buffers and read-ahead slots are 2 MiB-aligned private memory with huge pages
    asked for: a direct read into them goes out in the device's largest requests."""
    import ctypes

    mapping, view = pread.huge_buffer(3 * MiB)
    try:
        assert len(view) == 3 * MiB and not view.readonly
        anchor = ctypes.c_char.from_buffer(view)
        assert ctypes.addressof(anchor) % pread.HUGE == 0
        del anchor
        view[:5] = b"abcde"
        assert bytes(view[:5]) == b"abcde"
    finally:
        view.release()
        mapping.close()


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


def test_cold_expert_shards_read_only_their_pages(tmp_path: Path) -> None:
    """An expert-parallel rank's experts (64 MiB sources, half of them: whole windows to read
    ahead) read cold: bitwise right, and, measured outside lazysd, exactly the planned pages
    read from storage and not one page beyond them cached."""
    from lazysd.dryrun import EPLayout
    from tests.support.pagecache import storage_bytes

    spec = _expert_spec(layers=2)
    path = make_checkpoint(tmp_path / "ckpt", spec)
    keys = ["model.layers.1.moe.experts.gate_and_up_projs", "model.layers.1.moe.experts.down_projs"]
    # Cloned: views of safetensors' file mappings would keep the pages from being evicted.
    eager = {k: v.clone() for k, v in native_state_dict(load_hf_tensors(path), 2).items() if k in keys}
    for one_by_one in (True, False):  # a tensor at a time, and all through one pipeline
        files = _evict_all(path)
        with VirtualStateDict(path) as vsd:
            boxes = {key: EPLayout(2).box(vsd.entry(key), 1) for key in keys}
            vsd.reader.own = lambda: [(vsd.entry(k), b) for k, b in boxes.items()]  # noqa: B023
            ranges = [r for k, b in boxes.items() for item in vsd.reader.plan(vsd.entry(k), b) for r in item.ranges()]
            before = storage_bytes()
            fills = [(vsd.entry(k), b, torch.empty(box_shape(b), dtype=eager[k].dtype)) for k, b in boxes.items()]
            if one_by_one:
                for fill in fills:
                    vsd.reader.fill(*fill)
            else:
                vsd.reader.fill_many(fills)
            read = storage_bytes() - before
            assert vsd.reader._prefetcher is not None or not vsd.checkpoint.range_reader(files[0]).direct()
        for entry, box, dest in fills:
            assert_bitwise_equal({entry.key: dest}, {entry.key: eager[entry.key][box[0][0] : box[0][1]]})
        _no_page_beyond(files, ranges)
        pages = _pages_bytes(ranges, files)
        assert pages <= read <= pages + len(files) * pread.ALIGN


def test_cold_load_state_dict_reads_ahead_across_tensors(tmp_path: Path) -> None:
    """``load_state_dict(vsd)`` fills one tensor at a time, but every key is the
    VirtualStateDict's to read: a cold load's read-ahead streams read most of the checkpoint
    for the fills, across tensor boundaries; bitwise right, each byte read once."""
    from tests.support.pagecache import storage_bytes

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
        before = storage_bytes()
        model.load_state_dict(vsd)
        read = storage_bytes() - before
        planned = sum(n for _, _, n in ranges)
        assert vsd.bytes_read == planned
        prefetcher = vsd.reader._prefetcher
    assert_bitwise_equal(model.state_dict(), eager)
    if prefetcher is None:
        pytest.skip("this filesystem refuses O_DIRECT: nothing is read ahead (bytes checked above)")
    assert prefetcher.bytes_read >= planned // 2
    # Once from storage, in whole pages (a file's first tensor page came in with its header).
    assert planned - len(files) * pread.ALIGN <= read <= planned * 1.01 + 16 * pread.ALIGN
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
def _blob_file(tmp_path: Path, size: int, *, cold: bool = True) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / "blob"
    path.write_bytes(data)
    if cold:
        evict(path)
        if resident_pages(path):
            pytest.skip("this filesystem does not honour page-cache eviction")
    return str(path), data


def _opener(opened: list[int] | None = None):  # noqa: ANN202
    """As the reader opens the streams' descriptors: direct ones, and buffered ones with
    readahead off for the page-cache probes; skips where O_DIRECT is refused."""

    def open_fd(file: str, flags: int) -> int:
        fd = os.open(file, os.O_RDONLY | flags)
        if not flags:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        if opened is not None:
            opened.append(fd)
        return fd

    return open_fd


def _take(p, f: str, data: bytes, pos: int, n: int) -> bytes:  # noqa: ANN001
    """What a fill does: the bytes from the read-ahead where it has them, else from the file."""
    out = bytearray(n)
    view, done = memoryview(out), 0
    while done < n:
        got = p.serve(f, pos + done, view[done:])
        if got < 0:
            view[done : done - got] = data[pos + done : pos + done - got]
            got = -got
        done += got
    return bytes(out)


def _until(p, n: int) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 30
    while p.bytes_read < n and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # and no further
    assert p.bytes_read == n


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Pieces of 1 MiB, four held at once: the prefetcher's limits on small files."""
    from lazysd import prefetch

    monkeypatch.setattr(prefetch, "PIECE", MiB)
    monkeypatch.setattr(prefetch, "SLOTS", 4)
    return prefetch


@pytest.fixture
def lent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of every :meth:`Prefetcher.lend` call of the test, 0 where it lent none."""
    from lazysd import prefetch

    lend, calls = prefetch.Prefetcher.lend, []

    def counted(self, file: str, pos: int, n: int, use) -> bool:  # noqa: ANN001
        done = lend(self, file, pos, n, use)
        calls.append(n if done else 0)
        return done

    monkeypatch.setattr(prefetch.Prefetcher, "lend", counted)
    return calls


def test_prefetcher_reads_its_windows_ahead_and_nothing_else(tmp_path: Path, small_pieces) -> None:
    """Streams read only inside their windows, from where the fills are, at most SLOTS pieces
    ahead of them; the fills get exactly the file's bytes from them; a piece served in full
    frees its slot; consumed() moves them on; close() stops them and closes what it opened."""
    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 24 * MiB)
    windows = [(f, 1 * MiB, 9 * MiB), (f, 12 * MiB, 20 * MiB)]
    opened: list[int] = []
    p = prefetch.Prefetcher(windows, _opener(opened), at=(f, 2 * MiB), streams=2)
    _until(p, 4 * MiB)  # from the piece the fills are in (2-3 MiB): four pieces, then slots are full
    assert _take(p, f, data, 2 * MiB + 100, 3 * MiB) == data[2 * MiB + 100 : 5 * MiB + 100]
    _until(p, 6 * MiB)  # two pieces served in full: two more read
    assert _take(p, f, data, 5 * MiB + 100, 4 * MiB - 100) == data[5 * MiB + 100 : 9 * MiB]
    # The fills jump on (the streams can be three pieces past 9 MiB by now, at 15 MiB at
    # most): the streams never read what the fills jumped over, and hold SLOTS at most.
    p.consumed(f, 19 * MiB)
    time.sleep(0.3)
    with p._cond:
        jumped = p._starts.index((f, 17 * MiB))
        assert p._state[p._pos[jumped]] == prefetch._QUEUED and len(p._held) <= prefetch.SLOTS
    assert _take(p, f, data, 0, 24 * MiB) == data  # outside the windows and skipped: the fills' own
    p.close()
    assert p.bytes_read <= 16 * MiB  # the windows' bytes, each once at most
    assert all(not t.is_alive() for t in p._threads) and not p._held
    for fd in opened:  # every descriptor it opened is closed
        with pytest.raises(OSError):
            os.fstat(fd)


def test_prefetcher_lends_a_pieces_bytes_in_place(tmp_path: Path, small_pieces) -> None:
    """lend() hands a fill the address of bytes one piece holds (in its slot, read by a
    stream) and counts them served; where no one piece holds them all (across two pieces,
    outside the windows) it does nothing and says so, and the fill reads them as before."""
    import ctypes

    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 8 * MiB)
    p = prefetch.Prefetcher([(f, 0, 4 * MiB)], _opener(), at=(f, 0), streams=1, tune=False)
    got: list[bytes] = []

    def use(address: int, n: int = 4096) -> None:
        got.append(ctypes.string_at(address, n))

    assert p.lend(f, 100, 4096, use) and got == [data[100:4196]]
    k = p._pos[0]
    assert p._left[k] == MiB - 4096 and not p._lent
    assert not p.lend(f, MiB - 10, 100, use) and len(got) == 1  # across two pieces
    assert p._left[p._pos[0]] == MiB - 4096 and p._left[p._pos[1]] == MiB  # nothing counted
    assert not p.lend(f, 5 * MiB, 4096, use) and len(got) == 1  # outside the windows
    # The rest of the first piece served, through either path: its slot is free.
    assert p.lend(f, 0, 100, lambda a: use(a, 100)) and got[-1] == data[:100]
    assert _take(p, f, data, 4196, MiB - 4196) == data[4196:MiB]
    assert k not in p._held
    assert _take(p, f, data, 0, 8 * MiB) == data
    p.close()


def test_prefetcher_close_waits_for_a_slot_lent_out(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """A slot stays mapped while a fill copies out of it: close() on another thread waits
    for the copy instead of unmapping the memory under it; nor is a lent piece given up."""
    import ctypes
    import threading

    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 4 * MiB)
    p = prefetch.Prefetcher([(f, 0, 4 * MiB)], _opener(), at=(f, 0), streams=1, tune=False)
    _until(p, 4 * MiB)  # every piece read: the stream has ended
    inside, go, got = threading.Event(), threading.Event(), []

    def use(address: int) -> None:
        inside.set()
        go.wait(10)
        got.append(ctypes.string_at(address, MiB))

    lender = threading.Thread(target=lambda: got.append(p.lend(f, 0, MiB, use)))
    lender.start()
    assert inside.wait(10)
    monkeypatch.setattr(prefetch, "SLOTS", 0)
    with p._cond:
        p._idle()  # what the streams do when the fills stop, here keeping no piece: but the lent one
        assert list(p._held) == [p._pos[0]]
    closer = threading.Thread(target=p.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting for the lent slot
    go.set()
    lender.join(10)
    closer.join(10)
    assert not closer.is_alive() and got == [data[:MiB], True]
    assert not p._held and not p._lent


def test_prefetcher_streams_end_when_the_fills_stop(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """A load left unfinished: streams waiting for a slot end after a while, without close();
    when the fills do take their pieces after all (a slow tensor, not a stop), streams start
    again."""
    prefetch = small_pieces
    monkeypatch.setattr(prefetch, "IDLE_S", 0.2)
    f, data = _blob_file(tmp_path, 8 * MiB)
    p = prefetch.Prefetcher([(f, 0, 8 * MiB)], _opener(), streams=2)
    _until(p, 4 * MiB)
    for t in list(p._threads):
        t.join(10)
    assert all(not t.is_alive() for t in p._threads)
    assert _take(p, f, data, 0, 8 * MiB) == data
    p.close()
    assert 6 * MiB <= p.bytes_read <= 8 * MiB and not p._held  # the last pieces may be the fills'


def test_prefetcher_survives_a_failing_stream(tmp_path: Path) -> None:
    from lazysd.prefetch import PIECE, Prefetcher

    def refuse(file: str, flags: int) -> int:
        raise OSError(13, "permission denied")

    f = str(tmp_path / "x")
    p = Prefetcher([(f, 0, 4 * PIECE)], refuse, streams=2)
    for t in list(p._threads):
        t.join(10)
    out = memoryview(bytearray(PIECE))
    assert p.serve(f, 0, out) == -PIECE  # the fills read it themselves, and report what fails
    p.close()
    assert p.bytes_read == 0


def test_prefetcher_reads_in_the_order_the_fills_use_the_bytes(tmp_path: Path, small_pieces) -> None:
    """Fills need not go in file order (an embedding stored last but loaded first; layer 10
    stored before layer 2): the streams read pieces in the order of the ranks of their
    ``uses``; inside a rank the fills may go in any order, and the rank's pieces stay theirs."""
    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 8 * MiB)
    uses = [(0, f, 6 * MiB + 100, MiB), (1, f, 0, 6 * MiB), (2, f, 0, 8 * MiB)]  # the tail first, then the rest
    p = prefetch.Prefetcher([(f, 0, 8 * MiB)], _opener(), at=(f, 6 * MiB + 100), uses=uses, streams=2)
    assert [lo // MiB for _, lo, _ in p.pieces] == [6, 7, 0, 1, 2, 3, 4, 5]
    _until(p, 4 * MiB)  # the tail, where the fills start, and on in fill order
    assert _take(p, f, data, 6 * MiB, 2 * MiB) == data[6 * MiB :]
    _until(p, 6 * MiB)
    p.consumed(f, 3 * MiB)  # rank 1, its fourth piece first: its first three stay the streams'
    assert _take(p, f, data, 3 * MiB, MiB) == data[3 * MiB : 4 * MiB]
    assert _take(p, f, data, 0, 3 * MiB) == data[: 3 * MiB]
    _until(p, 8 * MiB)
    assert _take(p, f, data, 4 * MiB, 2 * MiB) == data[4 * MiB : 6 * MiB]
    p.close()
    assert p.bytes_read == 8 * MiB  # every piece read ahead, none twice


def test_load_state_dict_read_ahead_guesses_the_models_order() -> None:
    """``load_state_dict`` fills one value at a time, in the model's order: read ahead in the
    order a release is written in (the model's), whatever order the values are listed in."""
    from lazysd.reader import _likely_order

    ranges = {
        "lm_head.weight": [("b", 0, 8)],  # listed first, stored last
        "model.layers.10.w": [("a", 30, 8)],  # stored before layer 2
        "model.layers.2.mlp": [("a", 60, 8)],
        "model.layers.2.attn": [("a", 50, 8)],  # listed after mlp, stored before it
        "model.norm.weight": [("a", 90, 8)],
        "model.embed_tokens.weight": [("a", 0, 8)],
    }
    assert _likely_order(ranges) == [
        "model.embed_tokens.weight",
        "model.layers.2.attn",
        "model.layers.2.mlp",
        "model.layers.10.w",
        "model.norm.weight",
        "lm_head.weight",
    ]


def test_rank_windows_hold_one_rank_each() -> None:
    """Windows are the whole pages of one rank's touching ranges, the least of them left out."""
    from lazysd.prefetch import rank_windows

    page = pread.ALIGN
    uses = [(0, "a", 100, 10 * page), (0, "a", 100 + 10 * page, 10 * page), (1, "a", 100 + 20 * page, page)]
    assert rank_windows(uses, page) == [("a", page, 20 * page)]  # rank 1's part holds no whole page
    uses = [(1, "b", 0, 4 * page), (0, "a", 0, 8 * page), (2, "a", 4 * page, 8 * page)]  # overlap: rank 0's
    assert rank_windows(uses, page) == [("a", 0, 8 * page), ("a", 8 * page, 12 * page), ("b", 0, 4 * page)]
    assert rank_windows(uses, 5 * page) == [("a", 0, 8 * page)]


def test_read_ahead_ranks_split_only_large_interleaved_blocks() -> None:
    """One value at a time, a block larger than the slots whose values interleave in the
    files (per-expert tensors) is read ahead value by value, in the order their first bytes
    lie in; a block that fits, one whose values each lie in one run, and ``fill_many``
    (``room`` None) are read ahead block by block."""
    from lazysd.reader import _read_ahead_ranks

    ranges = {
        "m.layers.0.attn": [("f", 0, 40)],  # one run each: never split
        "m.layers.0.mlp": [("f", 40, 40)],
        "m.layers.1.down": [("f", 100, 10), ("f", 130, 10)],  # gate, up, down per expert
        "m.layers.1.gate_up": [("f", 80, 20), ("f", 110, 20)],
        "lm_head.weight": [("g", 0, 50)],
    }
    assert _read_ahead_ranks(list(ranges), ranges, 50) == (
        {"m.layers.0.attn": 0, "m.layers.0.mlp": 0, "m.layers.1.down": 2, "m.layers.1.gate_up": 1, "lm_head.weight": 3},
        {"m.layers.1": [".gate_up", ".down"]},
    )
    by_block = dict.fromkeys(["m.layers.0.attn", "m.layers.0.mlp"], 0)
    by_block |= {"m.layers.1.down": 1, "m.layers.1.gate_up": 1, "lm_head.weight": 2}
    assert _read_ahead_ranks(list(ranges), ranges, 60) == (by_block, {})  # layer 1 fits
    assert _read_ahead_ranks(list(ranges), ranges, None) == (by_block, {})


def test_shared_pages_are_the_partial_pages_outside_the_windows() -> None:
    """The pages at the ends of the uses that no window holds: what two values' fills share."""
    from lazysd.prefetch import rank_windows, shared_pages

    page = pread.ALIGN
    uses = [(0, "a", 100, 10 * page), (1, "a", 100 + 10 * page, 10 * page), (1, "b", 0, 3 * page + 5)]
    windows = rank_windows(uses, page)
    assert windows == [("a", page, 10 * page), ("a", 11 * page, 20 * page), ("b", 0, 3 * page)]
    assert shared_pages(uses, windows) == [("a", 0), ("a", 10 * page), ("a", 20 * page), ("b", 3 * page)]


def test_streams_read_the_shared_pages_next_to_their_pieces_into_the_page_cache(tmp_path: Path, small_pieces) -> None:
    """A page two values share lies outside both windows: each value's fill reads its part
    itself, a small read that waited for storage every time. A stream that takes the piece
    next to such a page has the kernel read it into the page cache (that page alone), where
    the fills find it."""
    from tests.support.pagecache import resident_map

    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 8 * MiB)
    page = pread.ALIGN
    edges = [(f, 0), (f, 4 * MiB)]
    p = prefetch.Prefetcher([(f, page, 4 * MiB)], _opener(), edges=edges, streams=1, tune=False)
    _until(p, 4 * MiB - page)
    deadline = time.monotonic() + 10
    while sum(resident_map(f)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    cached = [i * page for i, hit in enumerate(resident_map(f)) if hit]
    assert cached == [0, 4 * MiB]  # the shared pages only: the pieces were read direct
    assert _take(p, f, data, 0, 8 * MiB) == data
    p.close()


def test_prefetcher_goes_back_for_a_rank_the_fills_skipped(tmp_path: Path, small_pieces) -> None:
    """The fills may go through the values of a block read ahead value by value in another
    order than guessed (a model that registers ``down_projs`` first): they start past a
    rank and come back to it. The streams follow them back, so the rank skipped is read
    ahead as well (each piece once); before, they ended at the last rank."""
    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 12 * MiB)
    uses = [(0, f, 0, 4 * MiB), (1, f, 4 * MiB, 4 * MiB), (2, f, 8 * MiB, 4 * MiB)]
    p = prefetch.Prefetcher([(f, 0, 12 * MiB)], _opener(), at=(f, 8 * MiB), uses=uses, streams=2, tune=False)
    assert _take(p, f, data, 8 * MiB, 4 * MiB) == data[8 * MiB :]  # rank 2 first
    p.consumed(f, 0)  # back to rank 0: no fill has been there
    assert _take(p, f, data, 0, 8 * MiB) == data[: 8 * MiB]  # and on to rank 1
    p.close()
    assert p.bytes_read == 12 * MiB


def test_prefetcher_reranks_only_the_pieces_no_one_came_to(tmp_path: Path, small_pieces) -> None:
    """``rerank`` (the order of a block's values learned from the blocks before it) moves
    the pieces still queued, whole ranks at a time, and leaves those read or being read."""
    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 8 * MiB)
    uses = [(r, f, 2 * r * MiB, 2 * MiB) for r in range(4)]
    p = prefetch.Prefetcher([(f, 0, 8 * MiB)], _opener(), at=(f, 0), uses=uses, streams=2, tune=False)
    _until(p, 4 * MiB)  # ranks 0 and 1 held: the slots are full
    p.rerank({0: 9, 1: 8, 2: 3, 3: 2})
    assert [lo // MiB for _, lo, _ in p.pieces] == [0, 1, 2, 3, 6, 7, 4, 5]
    for r in (0, 1, 3, 2):
        assert _take(p, f, data, 2 * r * MiB, 2 * MiB) == data[2 * r * MiB : 2 * (r + 1) * MiB]
    p.close()
    assert p.bytes_read == 8 * MiB


def test_fills_wait_for_the_piece_a_stream_takes_next(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """A fill that gets ahead of the streams (the fill threads are in several pieces at
    once) waits for the piece they take next instead of reading it itself: taken, the
    streams one piece on would find the next one taken too and fall behind for good."""
    prefetch = small_pieces
    read = prefetch._pread_all

    def slow(*args):  # noqa: ANN002, ANN202
        time.sleep(0.05)  # the stream is in its read of the first piece a while
        return read(*args)

    monkeypatch.setattr(prefetch, "_pread_all", slow)
    f, data = _blob_file(tmp_path, 8 * MiB)
    p = prefetch.Prefetcher([(f, 0, 8 * MiB)], _opener(), at=(f, 0), streams=1, tune=False)
    while p._state[0] == prefetch._QUEUED:  # the stream has taken the first piece
        time.sleep(0.001)
    out = bytearray(MiB)
    assert p.serve(f, MiB, memoryview(out)) == MiB and out == data[MiB : 2 * MiB]  # the second: waited for
    assert _take(p, f, data, 0, 8 * MiB) == data
    p.close()
    assert p.bytes_read == 8 * MiB  # every piece by the stream


def test_a_fill_reads_a_piece_the_streams_passed_by_at_once(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """A piece the streams will not come back for (the fills jumped past it, and a fill on
    another thread still wants it) is the fill's to read at once: waiting for a stream, it
    would have waited until the slots filled up."""
    prefetch = small_pieces
    read = prefetch._pread_all

    def slow(*args):  # noqa: ANN002, ANN202
        time.sleep(0.2)
        return read(*args)

    monkeypatch.setattr(prefetch, "_pread_all", slow)
    f, data = _blob_file(tmp_path, 16 * MiB)
    p = prefetch.Prefetcher([(f, 0, 16 * MiB)], _opener(), at=(f, 0), streams=1, tune=False)
    _until(p, 4 * MiB)  # pieces 0-3 held: the slots are full
    p.consumed(f, 8 * MiB)  # the fills jump on to piece 8
    assert _take(p, f, data, 0, 4 * MiB) == data[: 4 * MiB]  # the stream goes on with 8-11
    t0 = time.monotonic()
    out = bytearray(MiB)
    assert p.serve(f, 5 * MiB, memoryview(out)) == -MiB  # piece 5: passed by, the fill's own
    assert time.monotonic() - t0 < 0.1
    assert _take(p, f, data, 0, 16 * MiB) == data
    p.close()


@pytest.mark.parametrize("first", ["down_projs", "gate_and_up_projs"])
def test_a_cold_load_of_per_expert_layers_larger_than_the_slots(tmp_path: Path, first: str, monkeypatch) -> None:
    """Per-expert layers larger than the read-ahead's slots hold, into a model that lists
    ``first`` first in each layer: the layers are read ahead value by value, in the order
    the model fills them (guessed from the files, learned from the first layer where the
    guess is wrong), so nearly every byte comes from the streams and none is read twice;
    bitwise right, and the peak within the bound."""
    from lazysd import prefetch, reader
    from lazysd.testing.families import ParamTree
    from tests.support.pagecache import storage_bytes

    # Pieces of 1 MiB, 16 slots at most: a layer (16 experts of 1 MiB a role, 48 MiB) holds
    # more than twice what the slots do.
    for module in (prefetch, reader):
        monkeypatch.setattr(module, "PIECE", 1 << 20)
        monkeypatch.setattr(module, "MOST", 16)
    layers_n = 4
    path, eager, files = _cold_qwen3_moe(
        tmp_path,
        num_hidden_layers=layers_n,
        num_experts=16,
        hidden_size=1024,
        moe_intermediate_size=512,
        vocab_size=1024,
    )
    with VirtualStateDict(path) as vsd:
        shapes = {k: (tuple(t.shape), t.dtype) for k, t in vsd.items()}
        order = sorted(shapes, key=lambda k: (_fill_group(k), first not in k, k))
        model = ParamTree({k: shapes[k] for k in order})
        before = storage_bytes()
        model.load_state_dict(vsd)
        read = storage_bytes() - before
        ranges = vsd.planned_ranges()
        prefetcher, roles = vsd.reader._prefetcher, vsd.reader._roles
        if prefetcher is None:
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed")
        windows = sum(hi - lo for _, lo, hi in prefetcher.pieces)
    assert_bitwise_equal(dict(model.state_dict()), eager)
    layers = [b for b in roles if b.startswith("model.layers.")]
    assert len(layers) == layers_n  # each read ahead value by value
    assert roles[layers[-1]][0].endswith(first)  # in the model's order, learned if need be
    # The first layer, guessed wrong, may leave a few pieces to the fills; before, the slots
    # filled with the other values' bytes and the fills read most of each layer themselves.
    assert prefetcher.bytes_read >= 0.9 * windows, (prefetcher.bytes_read, windows)
    assert read <= _pages_bytes(ranges, files) * 1.005, (read, _pages_bytes(ranges, files))


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


def test_prefetcher_runs_as_many_streams_as_its_tuner_says(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """Each epoch's rate goes to the tuner, and the streams follow its count: more streams
    start, and those above a lowered count stop taking pieces."""
    prefetch = small_pieces
    monkeypatch.setattr(prefetch, "SLOTS", 8)
    monkeypatch.setattr(prefetch, "EPOCH", 2 * MiB)
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
    n = 40
    f, data = _blob_file(tmp_path, n * MiB)  # epochs count bytes from storage, not the page cache
    p = prefetch.Prefetcher([(f, 0, n * MiB)], _opener(), streams=2)
    assert p.streams == 2
    for k in range(n):  # the fills, taking each piece once a stream has read it
        deadline = time.monotonic() + 30
        while p.bytes_read <= k * MiB and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _take(p, f, data, k * MiB, MiB) == data[k * MiB : (k + 1) * MiB]
    p.close()
    assert p.bytes_read == n * MiB and all(r > 0 for r in judged)
    assert {slot for slot, _ in taken} == set(range(6))  # four more started at the tuner's word
    # Once the count went down to 1 (fifth judgement), only slot 0 took new pieces.
    assert {slot for slot, j in taken if j >= 5} <= {0}
    assert all(not t.is_alive() for t in p._threads)


def test_prefetcher_tells_the_tuner_only_bytes_from_storage(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """Pieces the page cache holds already (the file was just written, or the fills' own
    reads got there first) are copied from there and say nothing of the storage's rate."""
    prefetch = small_pieces
    monkeypatch.setattr(prefetch, "EPOCH", 2 * MiB)
    judged: list[float] = []
    monkeypatch.setattr(prefetch.StreamTuner, "observe", lambda self, rate: judged.append(rate) or self.streams)
    f, data = _blob_file(tmp_path, 8 * MiB, cold=False)  # just written: cached
    fd = os.open(f, os.O_RDONLY)
    try:
        if pread.page_cached(fd, 0, 8 * MiB) is None:
            pytest.skip("no cachestat here: every piece is read from storage")
    finally:
        os.close(fd)
    p = prefetch.Prefetcher([(f, 0, 8 * MiB)], _opener(), streams=2)
    for half in (0, 4 * MiB):  # the streams fill the four slots, the fills take them
        _until(p, half + 4 * MiB)
        assert _take(p, f, data, half, 4 * MiB) == data[half : half + 4 * MiB]
    p.close()
    assert p.bytes_read == 8 * MiB and judged == []


def test_prefetcher_judges_no_epoch_spent_waiting_for_the_fills(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """An epoch in which a stream waited for a slot measured the fills, not the storage: the
    tuner is not told it. A later prefetcher on the same device starts where a tuning there
    settled."""
    prefetch = small_pieces
    monkeypatch.setattr(prefetch, "SLOTS", 1)
    monkeypatch.setattr(prefetch, "EPOCH", 2 * MiB)
    judged: list[float] = []
    observe = prefetch.StreamTuner.observe
    monkeypatch.setattr(prefetch.StreamTuner, "observe", lambda self, rate: judged.append(rate) or observe(self, rate))
    f, data = _blob_file(tmp_path, 4 * MiB)
    p = prefetch.Prefetcher([(f, 0, 4 * MiB)], _opener(), streams=1)
    for k in range(4):  # the fills take a piece only after the stream waited for them
        _until(p, (k + 1) * MiB)
        assert _take(p, f, data, k * MiB, MiB) == data[k * MiB : (k + 1) * MiB]
    p.close()
    assert p.bytes_read == 4 * MiB and judged == []
    # Nothing settled here; where a tuning on this device settled, the next one starts there.
    device = os.stat(f).st_dev
    monkeypatch.setitem(prefetch._settled, device, 3)
    q = prefetch.Prefetcher([(f, 0, MiB)], _opener())
    assert q.streams == 3
    q.close()


def test_cold_reads_of_own_boxes_read_ahead_only_those(tmp_path: Path) -> None:
    """A reader whose own values are one expert-parallel rank's boxes (as a VirtualStateDict
    on a mesh has): its first cold fill starts the read-ahead streams, which read the rank's
    stretches ahead, so later fills take their bytes from them; bitwise right, every byte
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
                # otherwise overtake them): the fills after this take their bytes from them.
                deadline = time.monotonic() + 30
                while prefetcher.bytes_read < 16 << 20 and time.monotonic() < deadline:
                    time.sleep(0.01)
        assert vsd.bytes_read == sum(n for _, _, n in ranges)
        if all(r._direct_fd is None for r in vsd.checkpoint._readers.values()):
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed (bytes checked above)")
        assert prefetcher is not None and prefetcher.bytes_read >= 32 << 20
    assert all(not t.is_alive() for t in prefetcher._threads)  # closed with the VirtualStateDict
    _no_page_beyond(files, ranges)


@pytest.mark.parametrize("cold", [False, True])
def test_staged_reads_start_the_read_ahead_only_when_cold(tmp_path: Path, cold: bool) -> None:
    """Staged reads (a cast here; every read into a GPU) are never read by the batched reads of
    cached bytes, so they reach the per-job paths warm or cold: warm, the read-ahead must not
    start (it would copy page-cache bytes into its slots for the fills to copy again); cold,
    it does. Bitwise right either way."""
    spec = _expert_spec(layers=2)
    path = make_checkpoint(tmp_path / "ckpt", spec, layout="single")
    eager = {k: v.to(torch.float32, copy=True) for k, v in native_state_dict(load_hf_tensors(path), 2).items()}
    files = _evict_all(path)
    if not cold:
        for f in files:
            f.read_bytes()
    with VirtualStateDict(path, dtype=torch.float32) as vsd:
        got = {k: v.materialize() for k, v in vsd.items()}
        started = vsd.reader._prefetcher is not None
        direct = any(r._direct_fd is not None for r in vsd.checkpoint._readers.values())
    assert_bitwise_equal(got, eager)
    if cold and not direct:
        pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed (values checked above)")
    assert started == cold


@pytest.mark.parametrize("how", ["load_state_dict", "lazysd.load"])
def test_a_cold_per_expert_load_reads_ahead_in_the_order_it_fills(
    tmp_path: Path, how: str, monkeypatch, lent: list[int]
) -> None:
    """A Qwen3-MoE release stores ``lm_head`` last and ``layers.10`` before ``layers.2``,
    and the values are filled in another order (``lm_head`` is the first key): the streams
    read ahead in the values' order, so most of the checkpoint is read by them, not skipped
    as if the fills were past it; bitwise right. ``lazysd.load`` fills block after block in
    that order too, telling the streams where it is job by job."""
    import lazysd
    from lazysd import prefetch
    from lazysd.testing.families import ParamTree
    from tests.support.pagecache import storage_bytes

    # Pieces of 1 MiB, at most four held: the streams get on only as the fills take them.
    monkeypatch.setattr(prefetch, "PIECE", 1 << 20)
    monkeypatch.setattr(prefetch, "SLOTS", 4)
    path, eager, files = _cold_qwen3_moe(
        tmp_path, num_hidden_layers=12, num_experts=8, hidden_size=512, moe_intermediate_size=256, vocab_size=32768
    )
    with VirtualStateDict(path) as vsd:
        assert next(iter(vsd)) == "lm_head.weight"
        model = ParamTree({k: (tuple(t.shape), t.dtype) for k, t in vsd.items()})
        before = storage_bytes()
        if how == "lazysd.load":
            lazysd.load(model, vsd)
        else:
            model.load_state_dict(vsd)
        read = storage_bytes() - before
        ranges = vsd.planned_ranges()
        prefetcher = vsd.reader._prefetcher
        if prefetcher is None:
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed")
        windows = sum(hi - lo for _, lo, hi in prefetcher.pieces)
    assert_bitwise_equal(dict(model.state_dict()), eager)
    # Most experts are transposed into place straight out of the slots (a piece of 1 MiB
    # holds three whole 256 KiB experts and parts of two), not copied into staging first.
    assert sum(lent) >= windows // 3, (sum(lent), windows)
    # The fills overtake the streams now and then on a busy machine; skipping everything
    # behind the first key's bytes (the end of the last file), or not being told where the
    # fills of lazysd.load were, left them under a tenth of it.
    assert prefetcher.bytes_read >= windows // 3
    # Each byte from storage once, in whole pages (a page two reads share may be read by
    # both): no piece read ahead (8 MiB) was given up and read again.
    assert read <= _pages_bytes(ranges, files) * 1.005, (read, _pages_bytes(ranges, files))


def test_a_cold_hf_keyed_copy_takes_whole_tensors_out_of_the_slots(
    tmp_path: Path, monkeypatch, lent: list[int]
) -> None:
    """Key by key from the HF-keyed view, cold: a tensor that one read-ahead piece holds is
    copied into its destination straight out of the piece's slot (:meth:`Prefetcher.lend`),
    outside the read-ahead's lock; the others as before; bitwise right."""
    from lazysd import prefetch
    from lazysd.automodel import HFCheckpointView

    monkeypatch.setattr(prefetch, "PIECE", 1 << 20)
    monkeypatch.setattr(prefetch, "SLOTS", 4)
    path, _, _ = _cold_qwen3_moe(
        tmp_path, num_hidden_layers=4, num_experts=8, hidden_size=512, moe_intermediate_size=256, vocab_size=32768
    )
    with HFCheckpointView(path) as hf, torch.no_grad():
        out = {k: torch.empty(hf[k].shape, dtype=hf[k].dtype) for k in hf}
        for k, t in out.items():
            t.copy_(hf[k])
        if hf.reader._prefetcher is None:
            pytest.skip("this filesystem refuses O_DIRECT: nothing is streamed")
    assert_bitwise_equal(out, load_hf_tensors(path))
    # The experts (256 KiB each: a 1 MiB piece holds three whole and parts of two); the
    # 32 MiB embedding and head lie across many pieces and are served piece by piece.
    experts = sum(t.nbytes for k, t in out.items() if ".mlp.experts." in k)
    assert sum(lent) >= experts // 2, (sum(lent), experts)


def test_prefetcher_holds_more_where_the_fills_interleave(tmp_path: Path, small_pieces) -> None:
    """A block whose values interleave in the file (per-expert tensors stacked by role) is
    filled value by value: each piece is served a part at a time and freed only at the end.
    The slots then grow, up to ``most``, so that the block is read ahead all the same; fills
    in file order keep to SLOTS."""
    prefetch = small_pieces
    f, data = _blob_file(tmp_path, 12 * MiB)
    uses = [(0, f, 0, 12 * MiB)]  # one block
    p = prefetch.Prefetcher([(f, 0, 12 * MiB)], _opener(), uses=uses, streams=2, most=8)
    _until(p, 4 * MiB)
    quarter = MiB // 4
    for k in range(12):  # the first value: a quarter of every piece
        if k == 3:  # more than half of the pieces held partly served: the slots grow to most
            _until(p, 8 * MiB)
        assert _take(p, f, data, k * MiB, quarter) == data[k * MiB : k * MiB + quarter]
    with p._cond:
        assert p._limit == 8 and len(p._held) == 8
    for k in range(12):  # the rest of the block: from the slots, and read by the fills past them
        assert _take(p, f, data, k * MiB + quarter, MiB - quarter) == data[k * MiB + quarter : (k + 1) * MiB]
    p.close()
    assert p.bytes_read == 8 * MiB  # no byte twice: the pieces the fills got to first are theirs

    q = prefetch.Prefetcher([(f, 0, 12 * MiB)], _opener(), uses=uses, streams=2, most=8)
    for k in range(12):
        assert _take(q, f, data, k * MiB, MiB) == data[k * MiB : (k + 1) * MiB]
        with q._cond:
            assert q._limit == prefetch.SLOTS
    q.close()


def test_prefetcher_gives_back_what_it_grew_when_the_fills_stop(tmp_path: Path, small_pieces, monkeypatch) -> None:
    """Interleaving fills that stop (a notebook that stacked one value of a per-expert
    block): once the streams idle out, the read-ahead holds SLOTS pieces again, the first in
    fill order, and no spare slot; a fill that comes back later gets the right bytes."""
    prefetch = small_pieces
    monkeypatch.setattr(prefetch, "IDLE_S", 0.3)
    f, data = _blob_file(tmp_path, 16 * MiB)
    p = prefetch.Prefetcher([(f, 0, 16 * MiB)], _opener(), uses=[(0, f, 0, 16 * MiB)], streams=2, most=8)
    quarter = MiB // 4
    _until(p, 4 * MiB)
    for k in range(3):
        assert _take(p, f, data, k * MiB, quarter) == data[k * MiB : k * MiB + quarter]
    _until(p, 8 * MiB)  # grown to most
    for t in list(p._threads):
        t.join(10)
    with p._cond:
        assert sorted(p._held) == [0, 1, 2, 3] and not p._slots
    assert p.bytes_read == 8 * MiB  # and nothing more was read
    assert _take(p, f, data, 0, 16 * MiB) == data
    p.close()
