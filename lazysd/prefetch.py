"""Reading a reader's own cold bytes ahead of its fills, straight from storage into staging.

``load_state_dict(vsd)`` fills one tensor at a time, and each fill waits for its own reads:
between two reads the storage has nothing to do, and a small tensor is one short request. A
:class:`Prefetcher` keeps the storage busy for the fills. Its ``streams`` threads take the
reader's own windows (the bytes its values need, in whole pages) :data:`PIECE` by
:data:`PIECE`, in the order the fills want them (below), and read each with ``O_DIRECT`` into
a slot of its own; a fill that gets to a piece copies its bytes out of the slot (waiting for
a piece being read; bytes that one piece holds whole it may take in place, :meth:`~Prefetcher.lend`),
and the slot is free once every byte of the piece was copied. At most
:data:`SLOTS` pieces are held (read or being read), so the streams never run more than that
far ahead of the fills, and the read-ahead's memory is bounded whatever the checkpoint.
A piece the fills get to before any stream did is theirs to read (direct), and no stream
reads it after them: no byte is read from storage twice (but where a piece given up for its
slot is wanted after all: below).

Why direct reads into huge pages: a direct read into 4 KiB pages is cut into requests of at
most the device's segment count of pages (254 on the build VM's virtio disk: 1016 KiB), and
buffered reads with readahead off fill the page cache with 4 KiB pages as well. Into a
2 MiB-aligned slot with transparent huge pages (:func:`lazysd.pread.huge_buffer`) the same
read goes out in the device's largest requests (4 MiB there). Measured on that VM (0.9 GiB of
safetensors evicted, 8 MiB reads, fresh process, 3 rounds): direct into huge pages
1.97-2.24 GiB/s on 1 or 2 threads, direct into 4 KiB pages 0.80-0.95, buffered with
readahead off 0.82-0.85, buffered with readahead on (four contiguous quarters, 4 threads, the
best a plain ``pread`` loader does there) 1.23-1.38. Direct reads are also exact: no
readahead runs past a window into another rank's experts, and the reads leave the page cache
as it was.

How many streams is the storage's to say, not ours: a local NVMe drive wants more than this
VM's virtio disk, a busy shared filesystem fewer. The count starts at :data:`STREAMS` (or where
the last prefetcher of this process on the same device settled) and a :class:`StreamTuner`
moves it on observed throughput: after every :data:`EPOCH` bytes read from storage it compares
the rate with that of the count before and keeps climbing, one stream at a time, while a step
pays (:data:`GAIN`); then it holds, and climbs again later, since shared storage changes under
a long load. What says nothing of the storage is not judged: the first epoch (the streams
start), epochs in which the streams waited for free slots (the fills were the bottleneck), and
pieces the page cache held already (:func:`lazysd.pread.page_cached`; copied from there).

The order: the fills want the bytes in the order of the values, which need not be the files'
(a Qwen3-MoE release stores ``layers.10`` before ``layers.2``, and ``lm_head``, its first
value, last). Each piece is ranked by the first value that reads it (``uses``: the reader
ranks values by block, or one by one in a block far larger than the slots:
:func:`lazysd.reader._read_ahead_ranks`), a rank's pieces go in file
order, and where the fills are is placed in that order. Pieces of the rank the fills left
last are held (a fill on another thread may still be in it); those of ranks before it stay
held while they take no more than half of the slots (a fill may come back for them), and
are given up beyond that. Inside a rank a piece is held until every byte of it was copied
out. Where the fills go through a block in another order than the file's (``load_state_dict``
of a model whose parameters are registered in another order than the release's; per-expert
tensors, which a native model stacks role by role: each piece holds some of every role),
most pieces held are partly served, and the slots grow to ``most`` (the reader gives what
its memory bound leaves once the staging is set aside; :data:`MOST` at most): a Qwen3-MoE
benchmark layer is then read ahead nearly whole while its ``down_projs`` are filled, and
its ``gate_and_up_projs`` come from the slots. A release's own per-expert layers are larger
than that (Qwen3-30B-A3B's: 1.2 GB): the reader ranks such a block's values one by one,
guessing their order from the files, and the fills may jump ahead to another value of the
block and back to one they skipped; the streams follow them both ways (no further back than
a rank no fill has been in), and :meth:`Prefetcher.rerank` puts the blocks no one has come
to yet in the order learned. Where the fills stop for :data:`IDLE_S` (a load left unfinished,
a notebook that stacked one value), the streams end and the read-ahead keeps its first
:data:`SLOTS` pieces only.

A fill that gets to a piece a stream is about to take waits for it: taking it, the fill
would read it between its own copies, and the streams, one piece on, would find the next
piece taken as well and fall behind for good. Pages two values share (safetensors' tensors
start anywhere in a page) lie in neither's window; each fill reads its part itself, a small
read that waited on storage every time (256 a layer of Qwen3-30B-A3B's ``down_projs``, 1.3
ms each on the build VM), so a stream that takes the piece next to one has the kernel read
that page into the page cache (:func:`shared_pages`).

A failed read only stops that stream: its piece goes back to the fills, which read the bytes
themselves and report any error.

Example:
    >>> f = "/ckpt/model-00001.safetensors"
    >>> p = Prefetcher([(f, 4096, 1 << 30)], lambda f, flags: os.open(f, os.O_RDONLY | flags))  # doctest: +SKIP
    >>> got = p.serve(f, 4096, memoryview(bytearray(1 << 20)))  # 1 MiB copied from a piece     # doctest: +SKIP
    >>> p.close()                                                                               # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
import threading
import time
from collections.abc import Callable

from .pread import ALIGN, address_of, huge_buffer, page_cached, whole_pages

MiB = 1 << 20
PIECE = 8 * MiB  # one read of a stream: two of the build VM's largest requests
SLOTS = 6  # pieces held at once (read or being read, not all copied out): 48 MiB; more if fills interleave
STREAMS = 2  # where the tuning starts: one read in flight while the other's bytes are copied
MAX_STREAMS = SLOTS - 2  # at least two slots hold pieces read for the fills
# Slots held at most where the fills interleave (256 MiB): enough for a layer of the Qwen3-MoE
# benchmark checkpoints (196 MiB; a release's own layers can be far larger), and
# no faster with more (cold Step3p5 2.8 GiB load_state_dict on the build VM: 20 slots
# 1.34-1.42 s, 52 slots 1.35-1.45 s, 6 slots 1.56-1.83 s), while fresh huge-page slots cost.
MOST = 32
_O_DIRECT = getattr(os, "O_DIRECT", 0)
MIN_WINDOW = 1 * MiB  # smaller windows are left to the fills: a stream would only wait on them
IDLE_S = 5.0  # a stream waiting this long for the fills to move on ends
EPOCH = 256 * MiB  # bytes read at one stream count before the tuner judges it
GAIN = 1.08  # a step to another count is kept when it reads this much faster (noise is ~5%)
HOLD = 16  # epochs at the settled count before climbing again

_QUEUED, _READING, _READY, _GONE = range(4)  # a piece's states (_GONE: the fills read it)

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

    def __init__(self, streams: int, *, lo: int = 1, hi: int = 8, gain: float = GAIN, hold: int = HOLD):
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
    """Streams that read ``windows`` ``(file, lo, hi)`` (sorted, page-aligned) ahead of the
    fills into slots, in the order the fills want them: by the least rank of the ``uses``
    ``(rank, file, offset, length)`` that overlap a piece (the fills read lower ranks first),
    in file order among equal ranks and where not given. The fills take the bytes with
    :meth:`serve` and say where they are with :meth:`consumed` (starting from ``at``).

    ``open_fd(file, flags)`` opens a new read-only descriptor of a file with ``flags``
    (``O_DIRECT`` for the reads, 0 for the page-cache probes); the prefetcher closes the ones
    it opened. ``most``: the pieces it may hold where the fills interleave (at least
    :data:`SLOTS`, which it holds otherwise; at most :data:`MOST`). ``streams``: the count to
    start at (default: :data:`STREAMS`, or where the last tuning on the same device settled;
    at most :data:`MAX_STREAMS`); ``tune=False`` keeps it. ``edges``: pages ``(file, offset)``
    the fills read themselves next to the windows (:func:`shared_pages`), read into the page
    cache as the streams take the pieces beside them.
    """

    def __init__(
        self,
        windows: list[tuple[str, int, int]],
        open_fd: Callable[[str, int], int],
        *,
        at: tuple[str, int] | None = None,
        uses: list[tuple[int, str, int, int]] | None = None,
        streams: int | None = None,
        tune: bool = True,
        most: int | None = None,
        edges: list[tuple[str, int]] | None = None,
    ) -> None:
        pieces = [(file, p, min(hi, p + PIECE)) for file, lo, hi in windows for p in range(lo, hi, PIECE)]
        self._starts = [(file, p) for file, p, _ in pieces]  # for bisect, in file order
        self._ends = [hi for _, _, hi in pieces]
        self._edges = sorted(edges or [])
        rank = _piece_ranks(pieces, self._starts, uses) if uses is not None else list(range(len(pieces)))
        # Per position in the order the fills want them (filled in by _arrange): the piece,
        # its rank, where its rank starts (the fills go through a rank's pieces in any order:
        # a block's parameters are not listed in the files' order), its index in file order.
        self.pieces: list[tuple[str, int, int]] = list(pieces)
        self._rank: list[float] = list(rank)
        self._first = [0] * len(pieces)
        self._index = list(range(len(pieces)))
        self._pos = list(range(len(pieces)))  # file order -> fill order
        self._left = [0] * len(pieces)  # bytes of each not yet served
        self._arrange(0, rank)
        self._visited: set[float] = set()  # ranks the fills have been in
        self._state = [_QUEUED] * len(pieces)
        self._held: dict[int, tuple[mmap.mmap, memoryview]] = {}  # piece -> its slot (being read, or read)
        self._lent: dict[int, int] = {}  # piece -> fills copying out of its slot now (lend)
        self._limit = SLOTS  # slots the streams may hold now; up to most where the fills interleave
        self._most = SLOTS if most is None else max(SLOTS, min(MOST, most))
        self._idled = False  # a stream ended waiting for the fills
        self._slots: list[tuple[mmap.mmap, memoryview]] = []  # free slots
        self._open = open_fd
        self._cond = threading.Condition()
        self._next = 0  # the next piece to read
        self._at = 0  # the first piece of the rank the fills are in
        self._left_at = 0  # ... and of the rank they were in before
        self._closed = False
        self._done = 0  # pieces gone (read by the fills, or served and freed)
        self._pid = os.getpid()  # a forked child has none of these threads: it reads for itself
        self.bytes_read = 0
        self._device = _device(windows[0][0]) if windows else None
        if streams is None:
            streams = _settled.get(self._device, STREAMS)
        self.tuner = StreamTuner(streams, hi=MAX_STREAMS) if tune else None
        self.streams = self.tuner.streams if self.tuner else min(MAX_STREAMS, max(1, streams))
        # (start, bytes from storage, judged): the first epoch is not, it holds the streams' start
        self._epoch = (time.monotonic(), 0, False)
        self._threads: list[threading.Thread] = []  # every stream started, for close()
        self._running: set[int] = set()  # the slots of the streams running now
        with self._cond:
            if at is not None:
                self._moved_to(*at)  # before any stream starts: nothing behind the fills is read
            self._start_streams()

    def serve(self, file: str, pos: int, out: memoryview) -> int:
        """Copy into ``out`` the bytes of ``file`` from ``pos`` that a stream read (waiting for
        a piece being read): returns how many (to the end of the piece at most). Or, where
        no stream has them (outside the windows, a piece the fills got to first), minus how
        many bytes from ``pos`` the caller reads itself.
        """
        j = bisect.bisect_right(self._starts, (file, pos)) - 1
        if j < 0 or self._starts[j][0] != file or pos >= self._ends[j]:
            following = self._starts[j + 1] if j + 1 < len(self._starts) else None
            to_next = following[1] - pos if following is not None and following[0] == file else len(out)
            return -min(len(out), to_next)
        lo, n = self._starts[j][1], min(len(out), self._ends[j] - pos)
        k = self._pos[j]
        with self._cond:
            if self._closed or os.getpid() != self._pid:
                return -n
            state = self._await(k)
            if state == _QUEUED:
                self._gone(k)  # the fills got here first: theirs to read
            if state != _READY:
                return -n
            out[:n] = self._held[k][1][pos - lo : pos - lo + n]
            self._took(k, n)
        return n

    def lend(self, file: str, pos: int, n: int, use: Callable[[int], object]) -> bool:
        """Have ``use(address)`` take the ``n`` bytes of ``file`` from ``pos`` where a stream
        read them (waiting for a piece being read), in place: ``address`` is their first
        byte in the piece's slot, which stays the piece's until ``use`` returns. Then they
        count as served: True. False, with nothing done, where no one piece holds them all
        (outside the windows, across two pieces, a piece the fills got to first): the
        caller reads them the usual way (:meth:`serve`).

        A fill that transposes the bytes into place (a per-expert release's expert) then
        copies them once, not into staging first; ``use`` runs outside the lock, so fills on
        several threads do not wait for each other's copies.
        """
        j = bisect.bisect_right(self._starts, (file, pos)) - 1
        if j < 0 or self._starts[j][0] != file or pos + n > self._ends[j]:
            return False
        lo, k = self._starts[j][1], self._pos[j]
        with self._cond:
            if self._closed or os.getpid() != self._pid or self._await(k) != _READY:
                return False
            self._lent[k] = self._lent.get(k, 0) + 1  # kept from _drop until use returns
            slot = self._held[k][1]
        try:
            use(address_of(slot) + pos - lo)
        finally:
            with self._cond:
                self._lent[k] -= 1
                if not self._lent[k]:
                    del self._lent[k]
                    self._cond.notify_all()  # close() waits for every slot lent out
                self._took(k, n)
        return True

    def consumed(self, file: str, offset: int) -> None:
        """The fills have got to ``offset`` of ``file``: the streams read on from the first
        piece of its rank, and pieces of earlier ranks may be given up for slots."""
        with self._cond:
            if self._moved_to(file, offset):
                self._start_streams()  # streams that ended waiting for the fills start again
                self._cond.notify_all()

    def rerank(self, ranks: dict[float, float]) -> None:
        """Read the pieces of rank ``r`` as if of rank ``ranks[r]`` from now on, where no
        stream or fill has come to them yet: the reader learned the order the fills go
        through the values of a block in, and the blocks still ahead are alike."""
        with self._cond:
            q = len(self.pieces)  # the untouched tail: pieces no one has come to, whole ranks
            while q > max(self._next, self._at) and self._state[q - 1] == _QUEUED:
                q -= 1
            while q < len(self.pieces) and self._first[q] != q:
                q += 1
            rank = [0.0] * len(self.pieces)  # by file order, as _arrange takes them
            for k in range(q, len(self.pieces)):
                rank[self._index[k]] = ranks.get(self._rank[k], self._rank[k])
            self._arrange(q, rank)

    def close(self) -> None:
        """Stop the streams (each finishes its current read), wait for them, free the slots."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join()
        with self._cond:
            while self._lent:  # a fill on another thread still copying out of a slot
                self._cond.wait()
            for k in list(self._held):
                self._drop(k)
            self._free_slots()
        if self.tuner is not None and self.tuner.settled and self._device is not None:
            _settled[self._device] = self.tuner.streams

    # ---- under the lock -------------------------------------------------------------------
    def _arrange(self, q: int, rank: list[float]) -> None:
        """Put the pieces from position ``q`` on (all still queued) in the order of ``rank``
        (by index in file order; stable: file order among equal ranks), each rank's pieces
        together."""
        order = sorted(self._index[q:], key=rank.__getitem__)
        for k, j in enumerate(order, q):
            self.pieces[k] = (*self._starts[j], self._ends[j])
            self._left[k] = self._ends[j] - self._starts[j][1]
            self._rank[k], self._index[k], self._pos[j] = rank[j], j, k
            self._first[k] = self._first[k - 1] if k > q and self._rank[k] == self._rank[k - 1] else k

    def _coming(self, k: int) -> bool:
        """Whether a stream will start piece ``k`` (queued) as soon as its current read is
        done: the fills wait for it rather than read it themselves (between their own copies
        and transposes, while the streams, one piece on, find the next piece taken as well
        and fall behind for good)."""
        return (
            bool(self._running)
            and not self._closed
            and len(self._held) < self._limit
            and 0 <= k - max(self._next, self._at) < self.streams  # not one they passed by
        )

    def _moved_to(self, file: str, offset: int) -> bool:
        j = bisect.bisect_right(self._starts, (file, offset)) - 1
        if j < 0 or self._starts[j][0] != file or offset >= self._ends[j]:
            # In the partial page before a window (a value's first bytes), or not in one: the
            # next fill that is says where the fills are.
            j += 1
            if j >= len(self._starts) or self._starts[j] >= (file, offset + ALIGN):
                return False
        k = self._first[self._pos[j]]
        rank, back = self._rank[k], k < self._at
        if k == self._at or (back and rank in self._visited):
            return False
        # Forward, or back to a rank the fills skipped (they fill the values of a block in
        # another order than the read-ahead guessed): the streams go there next.
        self._visited.add(rank)
        self._left_at, self._at = self._at, k
        if back:
            self._next = k
        return True

    def _await(self, k: int) -> int:
        """Piece ``k``'s state once no stream is about to read it or reading it (called
        holding the lock): a fill waits for the piece a stream takes next rather than read
        it itself (:meth:`_coming`)."""
        while self._state[k] == _QUEUED and self._coming(k):
            self._cond.wait(IDLE_S)
        while self._state[k] == _READING:
            self._cond.wait()
        return self._state[k]

    def _took(self, k: int, n: int) -> None:
        """The fills took ``n`` more bytes of piece ``k`` (called holding the lock)."""
        self._left[k] -= n
        if self._left[k] <= 0:
            self._drop(k)
            self._start_streams()  # streams that ended waiting for a slot start again
        elif self._limit < self._most and len(self._held) >= self._limit:
            self._cond.notify_all()  # streams waiting for a slot: are the fills interleaving?

    def _drop(self, k: int) -> None:
        """Piece ``k`` is done with: its slot is free (called holding the lock)."""
        self._slots.append(self._held.pop(k))
        self._gone(k)
        self._cond.notify_all()

    def _gone(self, k: int) -> None:
        """Piece ``k`` is no stream's any more; once every piece is, the slots go back to the
        OS (a VirtualStateDict often stays open long after its load)."""
        self._state[k] = _GONE
        self._done += 1
        if self._done == len(self.pieces):
            self._free_slots()

    def _free_slots(self) -> None:
        """Give the spare slots back to the OS (called holding the lock)."""
        for mapping, view in self._slots:
            view.release()
            mapping.close()
        self._slots.clear()

    def _interleaved(self) -> bool:
        """Whether more than half of the pieces held are partly served: the fills go through
        their block in another order than the file's (a model whose parameters are not
        registered in the release's order; per-expert tensors, stacked by role, interleave),
        and a piece is freed only once every value that reads it came by. Fills in file order
        are in one or two pieces at a time (one a fill thread)."""
        partly = 0
        for k in self._held:
            if self._state[k] == _READY:
                _, lo, hi = self.pieces[k]
                partly += 0 < self._left[k] < hi - lo
        return partly > len(self._held) // 2

    def _idle(self) -> None:
        """The fills stopped (a load left unfinished, a notebook that stacked one value):
        keep no more than :data:`SLOTS` pieces, the first in fill order, and no spare slot
        (called holding the lock, by the last stream to leave). A piece given up is the
        fills' to read, if they come back."""
        self._idled = False
        for k in sorted(self._held)[SLOTS:]:
            if self._state[k] == _READY and k not in self._lent:
                self._drop(k)
        self._free_slots()

    def _start_streams(self) -> None:
        """Start streams in the free places below the count (called holding the lock)."""
        if self._closed or self._next >= len(self.pieces):
            return
        self._threads = [t for t in self._threads if t.is_alive()]  # streams end and start again
        for slot in range(self.streams):
            if slot not in self._running:
                self._running.add(slot)
                t = threading.Thread(target=self._stream, args=(slot,), name=f"lazysd-prefetch-{slot}", daemon=True)
                self._threads.append(t)
                t.start()

    def _take(self, slot: int) -> tuple[int, memoryview] | None:
        """The next piece for stream ``slot`` to read and the slot it is read into, or None
        (no piece left, the count lowered, the fills gone)."""
        fresh = None  # a slot mapped outside the lock, where none was free
        try:
            while True:
                with self._cond:
                    k = self._next_piece(slot)
                    if k is None:
                        return None
                    if self._slots or fresh is not None:
                        self._next = k + 1
                        self._state[k] = _READING
                        if self._slots:
                            self._held[k] = self._slots.pop()
                        else:
                            self._held[k], fresh = fresh, None
                        return k, self._held[k][1]
                # Mapping a slot gives up the GIL, and getting it back behind threads busy in
                # long copies took 15-20 ms on the build VM: held under the lock, every fill
                # waited that long (a cold Qwen3-30B-A3B layer grew its 26 slots in 0.5 s).
                fresh = huge_buffer(PIECE)
        finally:
            if fresh is not None:  # not needed after all (the fills moved on, a slot came free)
                fresh[1].release()
                fresh[0].close()

    def _next_piece(self, slot: int) -> int | None:
        """The next piece for stream ``slot`` to read, once the slots allow it; None where
        there is none (called holding the lock)."""
        while True:
            if self._closed or slot >= self.streams:
                return None
            self._next = max(self._next, self._at)  # never behind the fills
            while self._next < len(self.pieces) and self._state[self._next] != _QUEUED:
                self._next += 1
            if self._next >= len(self.pieces):
                return None
            if len(self._held) < self._limit:
                return self._next
            # Pieces of ranks the fills have left (before the one they left last, which a
            # fill on another thread may still be reading, and not the one they went back
            # to): a fill may still come back for them (a model may fill a value later
            # than the values list it), so they are given up only where they would hold
            # more than half of the slots.
            behind = [
                k
                for k in self._held
                if k < self._left_at and self._first[k] != self._at and self._state[k] == _READY and k not in self._lent
            ]
            if len(behind) > SLOTS // 2:
                self._drop(min(behind))
                continue
            if self._limit < self._most and self._interleaved():
                self._limit = self._most  # from now on: the next blocks are alike
                continue
            self._epoch = (*self._epoch[:2], False)  # waiting for the fills: not the storage's rate
            if not self._cond.wait(IDLE_S):
                self._idled = True  # the last stream to leave gives back what it can (_idle)
                return None  # the fills stopped (a load left unfinished): do not hold on

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

    # ---- a stream ---------------------------------------------------------------------------
    def _stream(self, slot: int) -> None:
        fds: dict[tuple[str, int], int] = {}

        def fd(file: str, flags: int) -> int:
            if (file, flags) not in fds:
                fds[file, flags] = self._open(file, flags)
            return fds[file, flags]

        try:
            while (taken := self._take(slot)) is not None:
                k, view = taken
                file, lo, hi = self.pieces[k]
                ok = False
                try:
                    # From the page cache where it holds the piece (False where the system
                    # cannot tell: a probe that reads would start a read of the page itself).
                    cached = bool(page_cached(fd(file, 0), lo, hi - lo))
                    self._edges_ahead(fd(file, 0), file, lo, hi)
                    got = _pread_all(fd(file, 0 if cached else _O_DIRECT), view[: hi - lo], lo)
                    ok = got == hi - lo
                finally:
                    with self._cond:
                        if ok:
                            self._state[k] = _READY
                        else:
                            self._drop(k)  # the fills read it and report what went wrong
                        self._cond.notify_all()
                if not ok:
                    break
                self._count(got if cached else 0, 0 if cached else got)
        except OSError:
            pass  # a hint only: the fills read these bytes themselves and report what fails
        finally:
            for f in fds.values():
                os.close(f)
            with self._cond:
                self._running.discard(slot)
                self._cond.notify_all()
                if self._idled and not self._running and not self._closed:
                    self._idle()

    def _edges_ahead(self, fd: int, file: str, lo: int, hi: int) -> None:
        """Have the kernel read the shared pages next to piece ``[lo, hi)`` into the page
        cache (:func:`shared_pages`), where the fills' own small reads of them find them."""
        e = bisect.bisect_left(self._edges, (file, lo - ALIGN))
        while e < len(self._edges) and self._edges[e] <= (file, hi):
            try:
                os.posix_fadvise(fd, self._edges[e][1], ALIGN, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):
                return  # a hint: the fills read these pages themselves either way
            e += 1


def rank_windows(uses: list[tuple[int, str, int, int]], least: int = MIN_WINDOW) -> list[tuple[str, int, int]]:
    """The windows to read ahead for ``uses`` ``(rank, file, offset, length)``: per file,
    the ranges of one rank merged where they touch, cut to the whole pages inside (a direct
    read's unit), sorted; those under ``least`` bytes are left to the fills. A piece then
    holds bytes of one rank only: it is copied out as the fills of that rank go by, and never
    held for a later rank (the bytes at a boundary of two are the fills' to read).

    Example:
        >>> rank_windows([(0, "a", 100, 10000), (0, "a", 10100, 9000), (1, "a", 19100, 9000)], 4096)
        [('a', 4096, 16384), ('a', 20480, 24576)]
    """
    merged: list[list] = []  # [rank, file, lo, hi]
    for r, file, off, n in sorted(uses, key=lambda u: (u[1], u[2])):
        last = merged[-1] if merged else None
        if last is not None and last[1] == file and off <= last[3]:
            if last[0] == r:
                last[3] = max(last[3], off + n)
                continue
            off, n = last[3], off + n - last[3]  # bytes another rank reads already: theirs
            if n <= 0:
                continue
        merged.append([r, file, off, off + n])
    out = []
    for _, file, lo, hi in merged:
        lo, hi = whole_pages(lo, hi - lo)
        if hi - lo >= max(least, 1):
            out.append((file, lo, hi))
    return sorted(out)


def shared_pages(uses: list[tuple[int, str, int, int]], windows: list[tuple[str, int, int]]) -> list[tuple[str, int]]:
    """The pages ``(file, offset)`` at the ends of the ``uses`` that no window covers: a page
    two values share (safetensors' tensors start anywhere in a page), which each value's fill
    reads itself, a page at a time. Sorted.

    Example:
        >>> shared_pages([(0, "a", 100, 10000), (1, "a", 10100, 9000)], [("a", 4096, 8192), ("a", 12288, 16384)])
        [('a', 0), ('a', 8192), ('a', 16384)]
    """
    windows = sorted(windows)
    pages = set()
    for _, file, off, n in uses:
        for at in (off, off + n):
            if at % ALIGN == 0:
                continue  # a page boundary: no page is shared there
            page = at - at % ALIGN
            j = bisect.bisect_right(windows, (file, page, math.inf)) - 1
            if not (j >= 0 and windows[j][0] == file and page < windows[j][2]):
                pages.add((file, page))
    return sorted(pages)


def _pread_all(fd: int, out: memoryview, pos: int) -> int:
    """``pread`` until ``out`` is full or the file ends; the bytes read."""
    done = 0
    while done < len(out):
        got = os.preadv(fd, [out[done:]], pos + done)
        if got <= 0:
            break
        done += got
    return done


def _piece_ranks(
    pieces: list[tuple[str, int, int]], starts: list[tuple[str, int]], uses: list[tuple[int, str, int, int]]
) -> list[float]:
    """Per piece, the least rank of the ``uses`` that overlap it (infinite: none)."""
    rank = [math.inf] * len(pieces)
    for r, file, off, n in uses:
        j = max(0, bisect.bisect_right(starts, (file, off)) - 1)
        while j < len(pieces) and starts[j] < (file, off + n):
            if starts[j][0] == file and pieces[j][2] > off:
                rank[j] = min(rank[j], r)
            j += 1
    return rank


def _device(file: str) -> int | None:
    try:
        return os.stat(file).st_dev
    except OSError:
        return None
