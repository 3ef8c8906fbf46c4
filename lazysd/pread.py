"""Reading byte ranges at the storage's speed: page cache when warm, direct I/O when cold.

:class:`RangeReader` reads ``len(out)`` bytes of a file at an offset into caller memory:

1. A bulk read (at least :data:`DIRECT_MIN` bytes) first reads the range's first page with
   ``preadv2(RWF_NOWAIT)``: if it is in the page cache, the whole range is read through the
   page cache (a warm load pays one extra 4 KiB copy).
2. Otherwise with ``O_DIRECT``
   on a second descriptor of the same open file: large requests go straight from storage
   into a page-aligned bounce buffer, then into ``out``. Measured on the 2-core build VM (a
   2.8 GiB checkpoint, cold, 2 threads, medians of 3): buffered 8 MiB ``pread`` with
   ``POSIX_FADV_RANDOM`` 0.61-0.84 GiB/s, with ``POSIX_FADV_WILLNEED`` one to four requests
   ahead 0.64-0.70, ``O_DIRECT`` 8-32 MiB 0.93-1.00 (and the same with 1 thread as with 4).
   Requests cover exactly the 4 KiB pages of the range, never a neighbour's bytes: kernel
   readahead stays off (``POSIX_FADV_RANDOM`` on the buffered descriptor), so expert-parallel
   ranks still read only their own bytes, and cold bytes read this way do not fill the page
   cache (what a ``POSIX_FADV_DONTNEED`` after the read would achieve, without the reads
   that other processes might have shared being dropped).
   Where the caller says the bytes around a cold range are its own too (``span``: every
   byte of it is being read), the middle of the span is read instead through a third
   descriptor that keeps kernel readahead on: readahead fills the page cache with large
   folios and keeps requests queued while the last ones are copied out, which on the 2-core
   build VM (kernel 6.18, virtio disk, 0.9 GiB evicted) moved 1.8-2.2 GiB/s against
   0.9-1.2 GiB/s for ``O_DIRECT`` at any request size and queue depth, and ~1.0 GiB/s for
   buffered reads with readahead off or ``POSIX_FADV_WILLNEED``. Readahead only stays
   inside the span if the streamed part starts on a :data:`STREAM_ALIGN` boundary (large
   folios are aligned to it) and stops :data:`STREAM_MARGIN` before the span's end (the
   asynchronous readahead was measured to run up to ~11 MiB past the last byte asked
   for); the head and tail outside go the direct way. So even then not one page outside the
   span is read, which the tests check with ``mincore``.
3. Reads below :data:`DIRECT_MIN` (no probe: cached or not, they go through the page
   cache), and any file or platform where ``O_DIRECT`` or ``RWF_NOWAIT`` is not
   supported (tmpfs, macOS, older kernels): a plain ``pread`` loop. That fallback is also
   what ``direct=False`` selects; both give the same bytes.

Example:
    >>> r = RangeReader(fd)                               # doctest: +SKIP
    >>> r.read(memoryview(bytearray(1 << 20)), 4096)      # doctest: +SKIP
    1048576
"""

from __future__ import annotations

import errno
import mmap
import os
import threading

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (the page size covers all devices)
DIRECT_MIN = 4 << 20  # below this a read is latency-bound: the page cache path is as fast
BOUNCE = 8 << 20  # one direct request (and the bounce buffer it lands in)
STREAM_ALIGN = 2 << 20  # where the streamed (readahead) part of a span starts and ends
STREAM_MARGIN = 16 << 20  # streamed reads stop this far before the span's end

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class BouncePool:
    """Page-aligned bounce buffers for direct reads, shared by the files of one checkpoint:
    as many exist as direct reads ever ran at once (one per reader thread), whatever the
    number of files. Private anonymous memory, given back by :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        return mmap.mmap(-1, BOUNCE + ALIGN, flags=flags) if flags else mmap.mmap(-1, BOUNCE + ALIGN)

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            self._free.append(buf)

    def close(self) -> None:
        with self._lock:
            for b in self._free:
                b.close()
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
        self._stream_fd: int | None = None  # readahead on; opened with the direct one
        self._spans: dict[tuple[int, int], bool] = {}  # span -> read cold (streamed)?
        self._streamed: set[tuple[int, int]] = set()  # spans streamed unprobed (stream_cold)
        self._direct_tried = not (direct and _O_DIRECT and self.nowait)
        self._direct_ok = not self._direct_tried
        self._lock = threading.Lock()
        self._own_pool = pool is None
        self._pool = pool or BouncePool()
        self.direct_bytes = 0  # bytes read with O_DIRECT so far
        self.stream_bytes = 0  # bytes read through the readahead descriptor so far

    def close(self) -> None:
        with self._lock:
            for fd in (self._direct_fd, self._stream_fd):
                if fd is not None:
                    os.close(fd)
            self._direct_fd = self._stream_fd = None
            self._direct_tried = True
        if self._own_pool:
            self._pool.close()

    def read(self, out: memoryview, pos: int, span: tuple[int, int] | None = None) -> int:
        """Read ``len(out)`` bytes at file offset ``pos`` into ``out``; returns the bytes read
        (fewer only where the file ends).

        ``span``: file offsets ``[lo, hi)`` around the range that the caller reads in full
        (this read is part of it): if the span is cold, bytes well inside it are read with
        readahead on (module docstring).
        """
        window = self._window(span) if span is not None and self.streams() else None
        if window is None:
            return self._read_probed(out, pos)
        end = pos + len(out)
        a = min(max(window[0], pos), end) - pos
        b = min(max(window[1], pos), end) - pos
        got = self._read_probed(out[:a], pos)  # before the window: nothing of ours read ahead there
        if got < a or a == b == len(out):
            return got
        if a < b:
            # Cached or not: the readahead of the chunk before has usually brought in the start
            # of this one, and reading on through the same descriptor keeps it going.
            streamed = _pread_full(self._stream_fd, out[a:b], pos + a)  # type: ignore[arg-type]
            with self._lock:
                self.stream_bytes += streamed
            got += streamed
            if got < b:
                return got
        # After the window, where its readahead may have marked pages to read further ahead
        # from: any buffered read there (the probe too) would set off more readahead, past the
        # span. Direct only.
        rest = self._read_direct(self._direct_fd, out[b:], pos + b)  # type: ignore[arg-type]
        return got + (rest if rest is not None else _pread_full(self.fd, out[b:], pos + b))

    def streams(self) -> bool:
        """Whether cold spans are streamed here: readahead on for their middle, and direct
        reads for the tail (which keep readahead from running past the span: where direct
        reads are refused, nothing streams)."""
        return self._direct() is not None and self._stream_fd is not None and self._direct_ok

    def stream_cold(self, span: tuple[int, int]) -> None:
        """Stream ``span`` as a cold one (without probing it): its middle is being read ahead
        into the page cache (:mod:`lazysd.prefetch`), where a direct read would miss it."""
        with self._lock:
            self._streamed.add(span)

    def reopen(self, flags: int = 0, *, random: bool = False) -> int:
        """A new descriptor of this very file, with ``flags``; readahead on (a stream with its
        own readahead state), or off with ``random`` (``POSIX_FADV_RANDOM``: exact reads).
        OSError where that is not possible.

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

    def _window(self, span: tuple[int, int]) -> tuple[int, int] | None:
        """The part of ``span`` to stream, or None: too small, or found cached (probed once per
        span, by its first reader, before any of it is streamed; a warm span is read through
        the page cache as any other range)."""
        window = stream_window(span)
        if window is None:
            return None
        lo = window[0]
        with self._lock:
            cold = span in self._streamed or self._spans.get(span)
            if cold is None:
                cold = self._spans[span] = not self.cached(lo, span[1] - lo)
                if len(self._spans) > 4096:  # spans are tensors: keep the recent ones
                    del self._spans[next(iter(self._spans))]
        return window if cold else None

    def _read_probed(self, out: memoryview, pos: int) -> int:
        """Read through the page cache where the range starts cached, else direct (bulk) or
        plain ``pread``."""
        if not len(out):
            return 0
        if self.nowait and len(out) >= DIRECT_MIN:
            # Probe the first page only: a ``RWF_NOWAIT`` read that misses still starts a
            # buffered read of every page it asked for (kernel readahead), which a direct
            # read of the same bytes would then repeat.
            first = min(len(out), ALIGN - pos % ALIGN)
            try:
                done = os.preadv(self.fd, [out[:first]], pos, _NOWAIT)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    self.nowait = False  # this filesystem cannot tell: plain reads from now on
                    return _pread_full(self.fd, out, pos)
                if exc.errno != errno.EAGAIN:
                    raise
                done = -1  # EAGAIN: not cached, storage has to be read
            if done == 0:
                return 0  # end of file
            if done < 0:
                if self._direct_ok:
                    direct_fd = self._direct()
                    if direct_fd is not None:
                        got = self._read_direct(direct_fd, out, pos)
                        if got is not None:
                            return got
                return _pread_full(self.fd, out, pos)
            # Warm (at least where it starts): the page cache serves it; whatever is missing
            # further on is read through it as well.
            return done + _pread_full(self.fd, out[done:], pos + done)
        return _pread_full(self.fd, out, pos)

    def cached(self, pos: int, n: int) -> bool:
        """Whether the first and last byte of ``[pos, pos + n)`` are in the page cache (a probe:
        a warm range is read through the page cache, a cold one in bulk).

        True where the platform cannot tell.
        """
        if not self.nowait or n <= 0:
            return True
        probe = bytearray(1)
        for at in (pos, pos + n - 1):
            try:
                if os.preadv(self.fd, [probe], at, _NOWAIT) != 1:
                    return True  # end of file: the read itself reports it
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return False
                return True
        return True

    def _direct(self) -> int | None:
        """The ``O_DIRECT`` descriptor of the same file, opened once; None where unsupported.

        The readahead descriptor (``_stream_fd``) is opened with it: both exist only where
        direct reads do, since only with them do head and tail stay out of the page cache.
        """
        if self._direct_tried:
            return self._direct_fd
        with self._lock:
            if not self._direct_tried:
                self._direct_tried = True
                try:
                    fd: int | None = self.reopen(_O_DIRECT)
                except OSError:
                    fd = None
                if fd is not None:
                    try:
                        self._stream_fd = self.reopen()  # default advice: the kernel reads ahead
                    except OSError:
                        pass
                self._direct_fd = fd
        return self._direct_fd

    def _read_direct(self, fd: int, out: memoryview, pos: int) -> int | None:
        """Read ``out`` at ``pos`` with ``O_DIRECT`` in aligned requests; None if refused at once."""
        bounce = self._pool.take()
        view = memoryview(bounce)
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
            view.release()
            self._pool.give(bounce)
            with self._lock:
                self.direct_bytes += done


def stream_window(span: tuple[int, int]) -> tuple[int, int] | None:
    """The part of a cold ``span`` read with readahead on: from the first :data:`STREAM_ALIGN`
    boundary in it to the last one :data:`STREAM_MARGIN` before its end; None if too small.

    Example:
        >>> stream_window((1 << 20, 64 << 20))
        (2097152, 50331648)
    """
    lo = -(-span[0] // STREAM_ALIGN) * STREAM_ALIGN
    hi = (span[1] - STREAM_MARGIN) // STREAM_ALIGN * STREAM_ALIGN
    return (lo, hi) if hi - lo >= STREAM_ALIGN else None


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
