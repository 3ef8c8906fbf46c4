"""Reading byte ranges at the storage's speed: page cache when warm, direct I/O when cold.

:class:`RangeReader` reads ``len(out)`` bytes of a file at an offset into caller memory:

1. A bulk read (at least :data:`DIRECT_MIN` bytes) first asks whether the range is in the
   page cache, of the pages that lie wholly inside it (a page it shares with a neighbour may
   have been cached by the neighbour's read): :func:`page_cached` counts them with
   ``cachestat``, which reads nothing; where the system has none, one-byte
   ``preadv2(RWF_NOWAIT)`` reads at :func:`probe_points`. Cached, the range is read through
   the page cache.
2. Otherwise with ``O_DIRECT`` on a second descriptor of the same open file, in requests of
   :data:`BOUNCE` bytes into a bounce buffer on transparent huge pages (:func:`huge_buffer`),
   then into ``out``. Into 4 KiB pages a direct read is cut into requests of at most the
   device's segment count of pages (254 on the build VM's virtio disk: 1016 KiB); into huge
   pages into its largest requests (4 MiB there), which on that VM moved 1.97-2.24 GiB/s
   against 0.80-0.95 (0.9 GiB evicted, 8 MiB reads, 1-4 threads; buffered reads with
   readahead off 0.82-0.85, with readahead on 1.23-1.38: :mod:`lazysd.prefetch`).
   Requests cover exactly the 4 KiB pages of the range, never a neighbour's bytes: no
   readahead, so expert-parallel ranks read only their own bytes, and cold bytes read this
   way do not fill the page cache (what a ``POSIX_FADV_DONTNEED`` after the read would
   achieve, without the reads that other processes might have shared being dropped).
   Where a :mod:`lazysd.prefetch` read-ahead holds the range (:meth:`RangeReader.read_ahead_by`),
   its bytes are copied from there.
3. Reads below :data:`DIRECT_MIN` (no probe: cached or not, they go through the page
   cache, with readahead off: ``POSIX_FADV_RANDOM``), and any file or platform where
   ``O_DIRECT`` or ``RWF_NOWAIT`` is not supported (tmpfs, macOS, older kernels): a plain
   ``pread`` loop. That fallback is also what ``direct=False`` selects; both give the same
   bytes.

Example:
    >>> r = RangeReader(fd)                               # doctest: +SKIP
    >>> r.read(memoryview(bytearray(1 << 20)), 4096)      # doctest: +SKIP
    1048576
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import threading
from collections.abc import Callable

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the page size covers all devices)
# Below this a read is latency-bound: the page cache path is as fast. At 1 MiB a fill's own
# cold reads of per-expert tensors go direct: a native load_state_dict of a release with
# Qwen3-30B-A3B's layers (3 MiB expert tensors; the read-ahead holds a fifth of a layer, the
# fills read the rest) took 2.21-2.44 s cold on the build VM against 2.59-2.87 s at 4 MiB,
# Step3p5 0.9 GiB 0.40-0.44 against 0.42-0.51 s (3 interleaved rounds each).
DIRECT_MIN = 1 << 20
BOUNCE = 8 << 20  # one direct request (and the bounce buffer it lands in)
HUGE = 2 << 20  # a transparent huge page

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def huge_buffer(size: int) -> tuple[mmap.mmap, memoryview]:
    """``size`` bytes of private anonymous memory from a :data:`HUGE` boundary on, with
    transparent huge pages asked for (``MADV_HUGEPAGE``, where the platform has it): direct
    reads into it go out in the device's largest requests (module docstring). Returns the
    mapping and the view; release the view before closing the mapping.

    Example:
        >>> mapping, view = huge_buffer(1 << 20)
        >>> len(view)
        1048576
        >>> view.release(); mapping.close()
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, size + HUGE, flags=flags) if flags else mmap.mmap(-1, size + HUGE)
    skip = -address_of(mapping) % HUGE
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE, skip, size)
        except OSError:
            pass  # no huge pages here: the reads still work, in smaller requests
    return mapping, memoryview(mapping)[skip : skip + size]


def address_of(buf: mmap.mmap | memoryview) -> int:
    """The address of writable buffer ``buf``'s first byte; no export of it is kept, so a
    mapping may still be closed once its views are released."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class BouncePool:
    """Bounce buffers (:func:`huge_buffer`) for direct reads, shared by the files of one
    checkpoint: as many exist as direct reads ever ran at once (one per reader thread),
    whatever the number of files. Given back by :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[tuple[mmap.mmap, memoryview]] = []

    def take(self) -> tuple[mmap.mmap, memoryview]:
        with self._lock:
            if self._free:
                return self._free.pop()
        return huge_buffer(BOUNCE + ALIGN)

    def give(self, buf: tuple[mmap.mmap, memoryview]) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        with self._lock:
            for mapping, view in self._free:
                view.release()
                mapping.close()
            self._free.clear()


class RangeReader:
    """Exact reads of one open file (``fd`` stays owned by the caller).

    Args:
        fd: a descriptor of the file, opened for reading.
        direct: use ``RWF_NOWAIT`` + ``O_DIRECT`` where the platform has them (see module
            docstring); False reads with plain ``pread`` only.
        pool: where bounce buffers come from (shared by the readers of one checkpoint);
            a reader of its own by default.
    """

    def __init__(self, fd: int, *, direct: bool = True, pool: BouncePool | None = None) -> None:
        self.fd = fd
        self.nowait = direct and bool(_NOWAIT) and hasattr(os, "preadv")
        self._direct_fd: int | None = None
        self._ahead: Callable[[int, memoryview], int] | None = None  # read_ahead_by
        self._direct_tried = not (direct and _O_DIRECT and self.nowait)
        self._direct_ok = not self._direct_tried
        self._lock = threading.Lock()
        self._own_pool = pool is None
        self._pool = pool or BouncePool()
        self.direct_bytes = 0  # bytes read with O_DIRECT so far

    def close(self) -> None:
        with self._lock:
            if self._direct_fd is not None:
                os.close(self._direct_fd)
            self._direct_fd = None
            self._ahead = None
            self._direct_tried = True
        if self._own_pool:
            self._pool.close()

    def read(self, out: memoryview, pos: int) -> int:
        """Read ``len(out)`` bytes at file offset ``pos`` into ``out``; returns the bytes read
        (fewer only where the file ends)."""
        ahead = self._ahead
        if ahead is None:
            return self._read_probed(out, pos)
        done = 0
        while done < len(out):
            mine = done  # out[mine:done]: what the read-ahead does not hold, read here in one go
            while done < len(out) and (got := ahead(pos + done, out[done:])) < 0:
                done -= got
            if done > mine:
                n = self._read_probed(out[mine:done], pos + mine)
                if n < done - mine:
                    return mine + n
            if done < len(out):
                done += got  # copied from the read-ahead
        return done

    def read_ahead_by(self, serve: Callable[[int, memoryview], int] | None) -> None:
        """Take the bytes a read-ahead holds from ``serve(pos, out)`` (:meth:`lazysd.prefetch.Prefetcher.serve`
        of this file): how many it copied into ``out``, or minus how many from ``pos`` to read
        here. None: read everything here."""
        self._ahead = serve

    def direct(self) -> bool:
        """Whether cold bulk reads of this file go direct (refused or unsupported: not)."""
        return self._direct() is not None and self._direct_ok

    def reopen(self, flags: int = 0, *, random: bool = False) -> int:
        """A new descriptor of this very file, with ``flags``; readahead off with ``random``
        (``POSIX_FADV_RANDOM``: exact reads). OSError where that is not possible.

        Through ``/proc/self/fd``: the file this descriptor has open, even if the path was
        renamed or replaced since (identity checks stay on the first descriptor).
        """
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | flags | getattr(os, "O_CLOEXEC", 0))
        if os.fstat(fd).st_ino != os.fstat(self.fd).st_ino:
            os.close(fd)
            raise OSError(errno.ESTALE, "the file was replaced")
        if random and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def _read_probed(self, out: memoryview, pos: int) -> int:
        """Read through the page cache where the range is cached, else direct (bulk) or plain
        ``pread``."""
        if not len(out):
            return 0
        if len(out) >= DIRECT_MIN and self._direct_ok and not self.cached(pos, len(out)):
            direct_fd = self._direct()
            if direct_fd is not None:
                got = self._read_direct(direct_fd, out, pos)
                if got is not None:
                    return got
        return _pread_full(self.fd, out, pos)

    def cached(self, pos: int, n: int) -> bool:
        """Whether ``[pos, pos + n)`` is in the page cache (a warm range is read through the
        page cache, a cold one in bulk): :func:`page_cached`, or where the system cannot
        count pages, a one-byte ``RWF_NOWAIT`` read at :func:`probe_points`.

        True where the platform cannot tell.
        """
        if not self.nowait or n <= 0:
            return True
        counted = page_cached(self.fd, pos, n)
        if counted is not None:
            return counted
        probe = bytearray(1)
        for at in probe_points(pos, n):
            try:
                if os.preadv(self.fd, [probe], at, _NOWAIT) != 1:
                    return True  # end of file: the read itself reports it
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return False
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    self.nowait = False  # this filesystem cannot tell: plain reads from now on
                return True
        return True

    def _direct(self) -> int | None:
        """The ``O_DIRECT`` descriptor of the same file, opened once; None where unsupported."""
        if self._direct_tried:
            return self._direct_fd
        with self._lock:
            if not self._direct_tried:
                self._direct_tried = True
                try:
                    self._direct_fd = self.reopen(_O_DIRECT)
                except OSError:
                    self._direct_fd = None
        return self._direct_fd

    def _read_direct(self, fd: int, out: memoryview, pos: int) -> int | None:
        """Read ``out`` at ``pos`` with ``O_DIRECT`` in aligned requests; None if refused at once."""
        bounce = self._pool.take()
        view = bounce[1]
        try:
            done = 0
            while done < len(out):
                start = pos + done
                lo = start - start % ALIGN
                want = min(len(out) - done, BOUNCE - (start - lo))
                hi = -(-(start + want) // ALIGN) * ALIGN
                try:
                    got = os.preadv(fd, [view[: hi - lo]], lo)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or done:
                        raise
                    self._direct_ok = False  # the filesystem refuses these requests: buffered from now on
                    return None
                n = max(0, min(want, got - (start - lo)))
                out[done : done + n] = view[start - lo : start - lo + n]
                done += n
                if n < want:
                    break  # end of file
            return done
        finally:
            self._pool.give(bounce)
            with self._lock:
                self.direct_bytes += done


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


_CACHESTAT = 451  # cachestat(2): the same number on every Linux architecture (the generic table)
_syscall = None  # libc's syscall(), once looked up; False where there is none


def page_cached(fd: int, pos: int, n: int) -> bool | None:
    """Whether ``[pos, pos + n)`` of ``fd`` is in the page cache: at least half of the pages
    that lie wholly inside it (a page shared with a neighbour may have been cached by the
    neighbour's read), counted with ``cachestat`` (Linux 6.5+). None where the system cannot
    count them.

    Unlike a ``RWF_NOWAIT`` read, which starts a read of the page it misses, ``cachestat``
    reads nothing: a cold range a probe asked about stays cold for the next probe (the reads
    of a fill are probed twice, by the batched kernel reads and here), and a page a direct
    read or the read-ahead reads is not also read into the page cache.

    Example:
        >>> page_cached(fd, 0, 1 << 20)  # doctest: +SKIP
        True
    """
    global _syscall
    if _syscall is None:
        libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
        _syscall = getattr(libc, "syscall", False)
    if not _syscall:
        return None
    lo, hi = whole_pages(pos, n)
    if lo >= hi:
        lo, hi = pos // ALIGN * ALIGN, -(-(pos + n) // ALIGN) * ALIGN
    stat = _CacheStat()
    if _syscall(_CACHESTAT, fd, ctypes.byref(_Range(lo, hi - lo)), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _syscall = False
        return None
    return 2 * stat.cache >= (hi - lo) // ALIGN


def probe_points(pos: int, n: int) -> tuple[int, int]:
    """Where to ask whether ``[pos, pos + n)`` is cached: at its first and last page that lie
    wholly inside it (a page shared with a neighbour may be cached by the neighbour's read),
    or at its ends where no page does.

    Example:
        >>> probe_points(100, 3 * 4096)
        (4096, 8192)
    """
    lo, hi = whole_pages(pos, n)
    return (lo, hi - ALIGN) if lo < hi else (pos, pos + n - 1)


def whole_pages(pos: int, n: int) -> tuple[int, int]:
    """``[lo, hi)``: the pages that lie wholly inside ``[pos, pos + n)`` (empty: ``lo >= hi``)."""
    return -(-pos // ALIGN) * ALIGN, (pos + n) // ALIGN * ALIGN


def gather_groups(runs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``(offset, length)`` runs (in file order) grouped where the gaps between them hold no
    whole page: the storage reads those gaps' pages anyway, so one :func:`read_gathered`
    call per group costs no extra I/O and saves a system call per run."""
    groups: list[list[tuple[int, int]]] = []
    for off, n in runs:
        if groups:
            last_off, last_n = groups[-1][-1]
            end = last_off + last_n
            whole_page = off // ALIGN * ALIGN - -(-end // ALIGN) * ALIGN >= ALIGN
            if end <= off and not whole_page and len(groups[-1]) < GATHER_MAX:
                groups[-1].append((off, n))
                continue
        groups.append([(off, n)])
    return groups


#: Runs per gathered read: two buffers each (the run, and the gap after it) within IOV_MAX.
GATHER_MAX = 500


def read_gathered(fd: int, out: memoryview, runs: list[tuple[int, int]]) -> int:
    """Read ``runs`` (``(offset, length)``, in file order, a :func:`gather_groups` group)
    back to back into ``out`` with one ``preadv`` of their whole span, the gaps read into a
    scratch buffer; returns the bytes of ``out`` filled (fewer only where the file ends)."""
    gap_max = max((b - a - n for (a, n), (b, _) in zip(runs, runs[1:])), default=0)
    scratch = memoryview(bytearray(max(gap_max, 1)))
    buffers, pos = [], 0
    for i, (off, n) in enumerate(runs):
        buffers.append(out[pos : pos + n])
        pos += n
        if i + 1 < len(runs) and runs[i + 1][0] > off + n:
            buffers.append(scratch[: runs[i + 1][0] - off - n])
    first, (last, last_n) = runs[0][0], runs[-1]
    if os.preadv(fd, buffers, first) == last + last_n - first:
        return pos
    # Short (end of file, or a signal): run by run, which tells how far the file goes.
    done = 0
    for off, n in runs:
        got = _pread_full(fd, out[done : done + n], off)
        done += got
        if got < n:
            break
    return done


def _pread_full(fd: int, out: memoryview, pos: int) -> int:
    """``pread`` into all of ``out`` from ``pos``; returns the bytes read (fewer only at EOF)."""
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], pos + done)
        if got == 0:
            break
        done += got
    return done
