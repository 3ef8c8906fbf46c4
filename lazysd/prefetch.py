"""Reading a reader's own cold stretches ahead of its fills, on several streams at once.

``load_state_dict(vsd)`` fills one tensor at a time, in file order: a cold load is one
sequential stream, whose kernel readahead keeps a few MiB in flight. Storage often sustains
more with several streams: on the 2-core build VM (virtio disk, 0.9-2.8 GiB cold, medians
of 4-5 rounds), ``pread`` of every tensor's bytes on 2 threads, each reading its own
contiguous share, moved 0.8-1.1 GiB/s, on 4 threads 0.9-1.8, on 8 threads 1.3-1.5.

A :class:`Prefetcher` does that for the parts of a reader's own stretches that its cold
reads stream anyway (:func:`lazysd.pread.stream_window`: the 2 MiB-aligned middle, ending
:data:`~lazysd.pread.STREAM_MARGIN` before the stretch does): ``streams`` threads take
:data:`SEGMENT`-sized pieces in file order, at most ``ahead`` bytes past where the fills are,
and read them into the page cache in :data:`REQUEST`-sized ``pread`` calls. Their
descriptors have readahead off: each request reads exactly its pages (the kernel issues it
whole), and leaves no readahead marks. With readahead on, marks the streams left near the end
of a window set off readahead in the fills' own reads, which ran ~5 MiB past the stretch, into
another rank's experts. The fills then find their bytes cached, or wait for pages already
being read: no byte is read from storage twice, and none outside the stretches.

Cold loads of the benchmark checkpoints (fresh process per run, interleaved, medians of 4-5):
0.9 GiB 0.84 -> 0.96 GiB/s, 2.8 GiB 1.02 -> 1.50 GiB/s with 4 streams of 8 MiB requests
(with readahead on instead: 0.95; 6 streams 0.82, 8 streams of 4 MiB 1.47 on 2.8 GiB).

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
import os
import threading
from collections.abc import Callable

MiB = 1 << 20
SEGMENT = 32 * MiB  # one stream's piece: long enough for its readahead to ramp up
REQUEST = 8 * MiB  # one pread of a piece (into a scratch buffer the stream reuses)
STREAMS = 4  # measured best on the build VM (module docstring)
AHEAD = 512 * MiB  # how far past the fills the streams may read
IDLE_S = 5.0  # a stream waiting this long for the fills to move on ends (and frees its buffer)


class Prefetcher:
    """Streams that read ``windows`` ``(file, lo, hi)`` (sorted: the order fills want them)
    into the page cache ahead of :meth:`consumed` (starting from ``at``).

    ``open_fd(file)`` opens a new read-only descriptor of a file (readahead off: see the
    module docstring); the prefetcher closes the ones it opened.
    """

    def __init__(
        self,
        windows: list[tuple[str, int, int]],
        open_fd: Callable[[str], int],
        *,
        at: tuple[str, int] | None = None,
        streams: int = STREAMS,
        ahead: int = AHEAD,
    ) -> None:
        self.segments = [
            (file, at, min(hi, at + SEGMENT)) for file, lo, hi in windows for at in range(lo, hi, SEGMENT)
        ]
        self._starts = [(file, at) for file, at, _ in self.segments]  # for bisect, in window order
        self._index = {file: i for i, (file, _, _) in reversed(list(enumerate(self.segments)))}
        self._open = open_fd
        self._ahead = max(1, ahead // SEGMENT)
        self._cond = threading.Condition()
        self._next = 0  # the next segment to read
        self._at = 0  # the segment the fills are in
        self._closed = False
        self.bytes_read = 0
        if at is not None:
            self.consumed(*at)  # before any stream starts: nothing behind the fills is read
        self._threads = [
            threading.Thread(target=self._stream, name=f"lazysd-prefetch-{i}", daemon=True)
            for i in range(min(streams, len(self.segments)))
        ]
        for t in self._threads:
            t.start()

    def consumed(self, file: str, offset: int) -> None:
        """The fills have got to ``offset`` of ``file``: the streams may read ``ahead`` past it."""
        first = self._index.get(file)
        if first is None:
            return
        k = max(first, bisect.bisect_right(self._starts, (file, offset)) - 1)
        with self._cond:
            if k > self._at:
                self._at = k
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the streams (each finishes its current request) and wait for them."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()

    def _take(self) -> tuple[str, int, int] | None:
        with self._cond:
            while not self._closed and self._next < len(self.segments) and self._next >= self._at + self._ahead:
                if not self._cond.wait(IDLE_S):
                    return None  # the fills stopped (a load left unfinished): do not hold on
            if self._closed or self._next >= len(self.segments):
                return None
            self._next = max(self._next, self._at)  # never behind the fills: those bytes are read
            segment = self.segments[self._next]
            self._next += 1
            return segment

    def _stream(self) -> None:
        fds: dict[str, int] = {}
        buf = bytearray(REQUEST)
        view = memoryview(buf)
        try:
            while (segment := self._take()) is not None:
                file, pos, end = segment
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = self._open(file)
                while pos < end and not self._closed:
                    got = os.preadv(fd, [view[: min(REQUEST, end - pos)]], pos)
                    if got <= 0:
                        break
                    pos += got
                    with self._cond:
                        self.bytes_read += got
        except OSError:
            pass  # a hint only: the fills read these bytes themselves and report what fails
        finally:
            for fd in fds.values():
                os.close(fd)
