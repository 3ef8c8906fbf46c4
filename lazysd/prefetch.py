"""Reading a reader's own cold stretches ahead of its fills, on several streams at once.

``load_state_dict(vsd)`` fills one tensor at a time: a cold load is one sequential stream
(within a block of the model, at least), whose kernel readahead keeps a few MiB in flight.
Storage often sustains more with several streams: on the 2-core build VM (virtio disk,
0.9-2.8 GiB cold, medians of 4-5 rounds), ``pread`` of every tensor's bytes on 2 threads,
each reading its own contiguous share, moved 0.8-1.1 GiB/s, on 4 threads 0.9-1.8, on 8
threads 1.3-1.5.

A :class:`Prefetcher` does that for the parts of a reader's own stretches that its cold
reads stream anyway (:func:`lazysd.pread.stream_window`: the 2 MiB-aligned middle, ending
:data:`~lazysd.pread.STREAM_MARGIN` before the stretch does): ``streams`` threads take
:data:`SEGMENT`-sized pieces in the order the fills want them (below), at most ``ahead``
bytes past where the fills are (each read of the fills tells :meth:`Prefetcher.consumed`),
and read them into the page cache in ``pread`` calls of up to :data:`REQUEST`. Their
descriptors have readahead off: each request reads exactly its pages (the kernel issues it
whole), and leaves no readahead marks. With readahead on, marks the streams left near the end
of a window set off readahead in the fills' own reads, which ran ~5 MiB past the stretch, into
another rank's experts. The fills then find their bytes cached, or wait for pages already
being read: no byte is read from storage twice, and none outside the stretches.

Cold loads of the benchmark checkpoints (fresh process per run, interleaved, medians of 4-5),
when the streams were first added: 0.9 GiB 0.84 -> 0.96 GiB/s, 2.8 GiB 1.02 -> 1.50 GiB/s
with 4 streams of 8 MiB requests (with readahead on instead: 0.95; 6 streams 0.82, 8 streams
of 4 MiB 1.47 on 2.8 GiB). Reading in fill order (below) took a cold 2.8 GiB Qwen3-MoE load
from 2.90 to 2.28 s.

How many streams is the storage's to say, not ours: a local NVMe drive wants more than this
VM's virtio disk, a busy shared filesystem fewer. The count starts at :data:`STREAMS` (or where
the last prefetcher of this process on the same device settled) and a :class:`StreamTuner`
moves it on observed throughput: after every :data:`EPOCH` bytes read from storage it compares
the rate with that of the count before and keeps climbing, one stream at a time, while a step
pays (:data:`GAIN`); then it holds, and climbs again later, since shared storage changes under
a long load. What says nothing of the storage is not judged: the first epoch (the streams
start), epochs in which the streams waited for the fills (the fills were the bottleneck), and
bytes the page cache held already (``RWF_NOWAIT`` finds them: the fills' own streamed reads
run ahead of where they report being). All streams' buffers together stay within
:data:`SCRATCH`, whatever the count.

The order: the fills want the bytes in the order of the values, which need not be the files'
(a Qwen3-MoE release stores ``layers.10`` before ``layers.2``, and ``lm_head``, its first
value, last). Each segment is ranked by the first value that reads it (``uses``: the reader
ranks values by block, :func:`lazysd.reader._fill_group`), and where the fills are is placed
in that order. (Read in file order, the streams were sent to the end of the last file by
the first fill, and left everything behind it to the fills.)

The bytes land in the page cache, as the streamed reads' bytes do anyway; ``ahead`` bounds
how far (a checkpoint larger than memory is not pulled in whole). A failed read only stops
that stream: the fill reads the bytes itself and reports any error.

Example:
    >>> f = "/ckpt/model-00001.safetensors"
    >>> p = Prefetcher([(f, 2 << 20, 1 << 30)], lambda f: os.open(f, os.O_RDONLY))  # doctest: +SKIP
    >>> p.consumed(f, 64 << 20)  # the fills got there                               # doctest: +SKIP
    >>> p.close()                                                                     # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from collections.abc import Callable

MiB = 1 << 20
SEGMENT = 32 * MiB  # one stream's piece: long enough for its readahead to ramp up
STREAMS = 4  # where the tuning starts: measured best on the build VM (module docstring)
MAX_STREAMS = 8
SCRATCH = 32 * MiB  # all streams' read buffers together...
REQUEST = 8 * MiB  # ...each at most this: one pread of a piece (into a buffer the stream reuses)
# Cached bytes are read without waiting for storage (Linux 4.14+): the tuner counts only the rest.
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
AHEAD = 512 * MiB  # how far past the fills the streams may read
IDLE_S = 5.0  # a stream waiting this long for the fills to move on ends (and frees its buffer)
EPOCH = 256 * MiB  # bytes read at one stream count before the tuner judges it
GAIN = 1.08  # a step to another count is kept when it reads this much faster (noise is ~5%)
HOLD = 16  # epochs at the settled count before climbing again

_settled: dict[int, int] = {}  # st_dev -> stream count the last tuning on that device settled on


class StreamTuner:
    """Hill-climbs a count of read streams on observed throughput.

    ``observe(rate)`` is told the rate of the last epoch, read with :attr:`streams` streams,
    and returns the count for the next. From the count it starts at, it tries one more while
    each step raised the rate by ``gain``; where the first step up did not, one fewer the same
    way; then it holds the best count seen for ``hold`` epochs and climbs again from there.

    Example:
        >>> t = StreamTuner(4)
        >>> rate = {3: 0.8, 4: 1.0, 5: 1.3, 6: 1.35, 7: 1.0}  # GiB/s the storage gives
        >>> [t.observe(rate[t.streams]) for _ in range(4)]
        [5, 6, 5, 5]
    """

    def __init__(self, streams: int, *, lo: int = 1, hi: int = MAX_STREAMS, gain: float = GAIN, hold: int = HOLD):
        self.lo, self.hi, self.gain, self.hold = lo, hi, gain, hold
        self.streams = min(hi, max(lo, streams))
        self._climb()

    @property
    def settled(self) -> bool:
        return self._hold > 0

    def observe(self, rate: float) -> int:
        n = self.streams
        if self._hold:
            self._hold -= 1
            if self._hold:
                return n
            self._climb()  # this epoch's rate is the new climb's base
        self._rates[n] = rate
        if n != self._best:
            if rate >= self._rates[self._best] * self.gain:
                self._best = n
            elif self._step > 0 and self._best == self._base:
                self._step = -1  # one more did not pay: try one fewer
                return self._go(self._base - 1)
            else:
                return self._settle()
        return self._go(self._best + self._step)

    def _climb(self) -> None:
        self._base = self._best = self.streams
        self._rates: dict[int, float] = {}
        self._step = 1
        self._hold = 0

    def _go(self, n: int) -> int:
        if not self.lo <= n <= self.hi:
            if self._step < 0 or self._best != self._base or self._base <= self.lo:
                return self._settle()
            self._step, n = -1, self._base - 1  # at the top already: try one fewer
        self.streams = n
        return n

    def _settle(self) -> int:
        self.streams, self._hold = self._best, self.hold
        return self._best


class Prefetcher:
    """Streams that read ``windows`` ``(file, lo, hi)`` (sorted) into the page cache ahead of
    :meth:`consumed` (starting from ``at``), in the order the fills want them: by the least
    rank of the ``uses`` ``(rank, file, offset, length)`` that overlap a segment (the fills
    read lower ranks first), in file order among equal ranks and where not given.

    ``open_fd(file)`` opens a new read-only descriptor of a file (readahead off: see the
    module docstring); the prefetcher closes the ones it opened. ``streams``: the count to
    start at (default: :data:`STREAMS`, or where the last tuning on the same device
    settled; at most :data:`MAX_STREAMS`); ``tune=False`` keeps it.
    """

    def __init__(
        self,
        windows: list[tuple[str, int, int]],
        open_fd: Callable[[str], int],
        *,
        at: tuple[str, int] | None = None,
        uses: list[tuple[int, str, int, int]] | None = None,
        streams: int | None = None,
        tune: bool = True,
        ahead: int | None = None,
    ) -> None:
        segments = [(file, at, min(hi, at + SEGMENT)) for file, lo, hi in windows for at in range(lo, hi, SEGMENT)]
        self._starts = [(file, at) for file, at, _ in segments]  # for bisect, in file order
        self._ends = [hi for _, _, hi in segments]
        rank = _segment_ranks(segments, self._starts, uses) if uses is not None else range(len(segments))
        order = sorted(range(len(segments)), key=rank.__getitem__)  # stable: file order among equals
        self.segments = [segments[j] for j in order]  # in the order the fills want them
        self._pos = [0] * len(segments)  # file order -> fill order
        for k, j in enumerate(order):
            self._pos[j] = k
        self._open = open_fd
        self._ahead = max(1, (AHEAD if ahead is None else ahead) // SEGMENT)
        self._cond = threading.Condition()
        self._next = 0  # the next segment to read
        self._at = 0  # the segment the fills are in
        self._closed = False
        self.bytes_read = 0
        self._device = _device(windows[0][0]) if windows else None
        if streams is None:
            streams = _settled.get(self._device, STREAMS)
        self.tuner = StreamTuner(streams) if tune else None
        self.streams = self.tuner.streams if self.tuner else min(MAX_STREAMS, max(1, streams))
        # (start, bytes from storage, judged): the first epoch is not, it holds the streams' start
        self._epoch = (time.monotonic(), 0, False)
        self._nowait = _NOWAIT
        self._threads: list[threading.Thread] = []  # every stream started, for close()
        self._running: set[int] = set()  # the slots of the streams running now
        with self._cond:
            if at is not None:
                self._moved_to(*at)  # before any stream starts: nothing behind the fills is read
            self._start_streams()

    def consumed(self, file: str, offset: int) -> None:
        """The fills have got to ``offset`` of ``file``: the streams may read ``ahead`` past it."""
        with self._cond:
            if self._moved_to(file, offset):
                self._start_streams()  # streams that ended waiting for the fills start again
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the streams (each finishes its current request) and wait for them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join()
        if self.tuner is not None and self.tuner.settled and self._device is not None:
            _settled[self._device] = self.tuner.streams

    def _moved_to(self, file: str, offset: int) -> bool:
        j = bisect.bisect_right(self._starts, (file, offset)) - 1
        if j < 0 or self._starts[j][0] != file or offset >= self._ends[j]:
            return False  # not in a window: the next fill that is says where the fills are
        k = self._pos[j]
        if k <= self._at:
            return False
        self._at = k
        return True

    def _start_streams(self) -> None:
        """Start streams in the free slots below the count (called holding the lock)."""
        if self._closed or self._next >= len(self.segments):
            return
        self._threads = [t for t in self._threads if t.is_alive()]  # streams end and start again
        for slot in range(self.streams):
            if slot not in self._running:
                self._running.add(slot)
                t = threading.Thread(target=self._stream, args=(slot,), name=f"lazysd-prefetch-{slot}", daemon=True)
                self._threads.append(t)
                t.start()

    def _take(self, slot: int) -> tuple[str, int, int] | None:
        with self._cond:
            while not self._closed and self._next < len(self.segments):
                if slot >= self.streams:
                    waited = self._cond.wait(IDLE_S)  # a slot the tuner closed
                elif self._next >= self._at + self._ahead:
                    self._epoch = (*self._epoch[:2], False)  # waiting for the fills: not the storage's rate
                    waited = self._cond.wait(IDLE_S)
                else:
                    break
                if not waited:
                    break  # the fills stopped (a load left unfinished): do not hold on
            else:
                return None
            if slot >= self.streams or self._next >= self._at + self._ahead:
                return None
            self._next = max(self._next, self._at)  # never behind the fills: those bytes are read
            segment = self.segments[self._next]
            self._next += 1
            return segment

    def _count(self, cached: int, got: int) -> None:
        """Count bytes the page cache held and bytes read from storage; at the end of an
        epoch (of the latter), let the tuner judge it."""
        with self._cond:
            self.bytes_read += cached + got
            start, n, judged = self._epoch
            n += got
            if self.tuner is None or n < EPOCH:
                self._epoch = (start, n, judged)
                return
            now = time.monotonic()
            if judged:
                streams = self.tuner.observe(n / max(now - start, 1e-9))
                if streams != self.streams:
                    self.streams = streams
                    self._start_streams()
                    self._cond.notify_all()
            self._epoch = (now, 0, True)

    def _stream(self, slot: int) -> None:
        fds: dict[str, int] = {}
        view = memoryview(b"")
        try:
            while (segment := self._take(slot)) is not None:
                file, pos, end = segment
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = self._open(file)
                size = min(REQUEST, SCRATCH // self.streams // MiB * MiB)
                if len(view) != size:  # the count changed: the buffers stay within SCRATCH
                    view = memoryview(bytearray(size))
                while pos < end and not self._closed:
                    n = min(size, end - pos)
                    cached = self._cached(fd, view[:n], pos)
                    got = os.preadv(fd, [view[cached:n]], pos + cached) if cached < n else 0
                    if cached + got <= 0:
                        break
                    pos += cached + got
                    self._count(cached, got)
        except OSError:
            pass  # a hint only: the fills read these bytes themselves and report what fails
        finally:
            for fd in fds.values():
                os.close(fd)
            with self._cond:
                self._running.discard(slot)

    def _cached(self, fd: int, view: memoryview, pos: int) -> int:
        """Bytes from ``pos`` that the page cache already holds (read into ``view``), as far
        as the platform tells (else 0)."""
        if not self._nowait:
            return 0
        try:
            return os.preadv(fd, [view], pos, _NOWAIT)
        except BlockingIOError:
            return 0
        except OSError:
            self._nowait = 0  # a filesystem without it: count every byte as read from storage
            return 0


def _segment_ranks(
    segments: list[tuple[str, int, int]], starts: list[tuple[str, int]], uses: list[tuple[int, str, int, int]]
) -> list[float]:
    """Per segment, the least rank of the ``uses`` that overlap it (infinite: none)."""
    rank = [math.inf] * len(segments)
    for r, file, off, n in uses:
        j = max(0, bisect.bisect_right(starts, (file, off)) - 1)
        while j < len(segments) and starts[j] < (file, off + n):
            if starts[j][0] == file and segments[j][2] > off:
                rank[j] = min(rank[j], r)
            j += 1
    return rank


def _device(file: str) -> int | None:
    try:
        return os.stat(file).st_dev
    except OSError:
        return None
