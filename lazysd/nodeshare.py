"""Node sharing for lazy values: the ranks of a node read each box they all need once.

``model.load_state_dict(VirtualStateDict(path, mesh))`` fills values one key at a time, in
the model's order, on every rank by itself; ranks may load different keys (``strict=False``,
a notebook indexing a few) or in another order, so nothing here runs in lock step or waits
for a rank that may never come. Instead the ranks of a node meet in shared memory
(a directory under ``/dev/shm``, one per job and checkpoint):

1. A rank about to read a box that other ranks of its node also need (computed from the
   mesh and placements alone: every rank knows every rank's boxes) first looks for it
   published by another rank, and copies it from there into its destination if found.
2. Otherwise it tries to *claim* the box (a lock file created atomically with its lock
   held). The first claimant reads the box from storage into its own destination, then
   publishes the bytes (written under a temporary name, renamed when complete) and drops
   the claim.
3. A rank that finds the box claimed waits for the claim to go: a claim is held only while
   its rank is reading from storage (never while waiting for anyone), so it goes when the
   bytes are published, when the claimant fails (then the waiter claims and reads itself,
   getting the same error if the storage is at fault) or when it dies (the kernel drops a
   dead process's locks). A wait is also bounded (``wait_seconds``): after that the waiter
   reads the box itself. Either way the data is right; nothing can hang.
4. Every published box counts the ranks that took it; the last of the ranks that need it
   removes it, so shared memory holds only boxes still on their way.

5. Read-ahead: left at that, ranks loading in the same order would read one box at a time
   for the whole node (the first to ask reads, the others wait). So each shared box also has
   an owner, the same on every rank (largest first onto the least loaded of the ranks that
   need it: :func:`owners`), and from the second key a rank asks for, its
   worker threads claim and read the boxes it owns among the next ``ahead_bytes`` (128 MiB)
   of shared boxes in checkpoint order straight into shared memory. The ranks' workers run
   at the same time, each on its own boxes, and a box claimed or published already is
   skipped, so read-ahead changes who reads, never how often. CPU values only.

So the first rank to need a box reads it and no rank waits for a rank that will not come:
ownership only decides who reads *ahead*; a fixed owner that every other rank waited for
would make them wait out a timeout per box whenever it loads in another order, or not at
all. Published boxes are named by a digest
of the job, the files' identities (device, inode, size, mtime and ctime locally; size and
ETag remote: objects without an ETag are never shared), the plan entry (sources, offsets,
transposes, FP8 scales), the box and the destination's dtype, so two checkpoints, two
versions of a file, or two conversions never mix.

Clean-up: every rank of the node that takes part holds a shared lock on the directory's
``members`` file while its VirtualStateDict is open; closing it (``close()``, the end of a
``with``, garbage collection, interpreter exit, Ctrl-C) releases it, and the last one out
removes the directory with everything left in it. A rank killed with SIGKILL loses its
lock too, so the others still remove the directory when they finish; if every rank of a
node is killed, the next load on that node removes directories nobody holds any more.

Memory: a box stays in shared memory from its publication until the last rank needing it
took it; read-ahead keeps at most ``ahead_bytes`` ahead of its rank, and only for kinds of
tensor (rules) its rank has loaded whole. Boxes that a rank counted on never takes (it
loads a subset, an export writes slices) stay until the directory goes, so each rank keeps
at most a quarter of the shared-memory filesystem, split over the node's ranks, published
and not yet taken by all; past that it stops publishing and the others read for themselves.
A membership directory is joined when the VirtualStateDict opens, so what others publish
for a rank stays at least until it closes.

It is on with ``share="node"`` (the default) when a default process group of more than one
rank is initialized and ``/dev/shm`` is writable; a single process never touches shared
memory or the store, so a single-rank load is exactly what it was. Ranks are on one node
when they see the same ``/dev/shm`` (host name, boot id and the mount's device), left in
the process group's store when the VirtualStateDict is opened (no collective); the first
shared read waits up to ``membership_seconds`` (5 s) for ranks that have not opened theirs
yet, once, and counts only those that have. A job that opens a VirtualStateDict on one rank
only should pass ``share=None``, or pay those seconds once.

Example:
    >>> vsd = VirtualStateDict("s3://bucket/ckpt/", mesh, storage_options=opts)  # doctest: +SKIP
    >>> model.load_state_dict(vsd)                                               # doctest: +SKIP
    >>> vsd.bytes_read, vsd.bytes_received                                       # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import shm
from .geometry import Box, full_box, shard_box

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .distributed import Target, Targets
    from .plan import Entry
    from .reader import Reader

_MAGIC = b"LAZYSD01"
_HEADER = 64  # magic, digest (32), payload bytes, ranks needing it, ranks that took it


class NodeShare:
    """One VirtualStateDict's sharing of boxes with the other ranks of its node.

    Args:
        checkpoint: the opened checkpoint (its files' identities name what is shared).
        reader: reads what this rank claims or cannot take.
        targets: the VirtualStateDict's placements (None: every rank holds whole tensors).
        rank, world: this process's rank and the world size of the default process group.
        store: the process group's store, where ranks leave their node's name and agree on
            a job token (set/compare_set/check only: no collective).
        entries, dtype_of: the plan's entries and the dtype each is read as, for read-ahead
            (None: no read-ahead); ``ahead_bytes``: how far it reads ahead.
        wait_seconds: the longest a rank waits for a box another rank is reading.
        membership_seconds: the longest the first shared read waits for the other ranks to
            say which node they are on.

    Attributes:
        bytes_received: bytes of boxes this rank took from the node instead of reading.
        tensors_received: boxes taken.
        bytes_published: bytes of boxes this rank read and published for the others.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        reader: Reader,
        targets: Targets | None,
        *,
        rank: int,
        world: int,
        store: Any,
        entries: Mapping[str, Entry] | None = None,
        dtype_of: Callable[[Entry], torch.dtype] | None = None,
        ahead_bytes: int = 128 << 20,
        wait_seconds: float = 300.0,
        membership_seconds: float = 5.0,
    ) -> None:
        self.checkpoint, self.reader, self.targets = checkpoint, reader, targets
        self.rank, self.world, self.store = rank, world, store
        self.wait_seconds, self.membership_seconds = wait_seconds, membership_seconds
        self.bytes_received = self.tensors_received = self.bytes_published = 0
        self._lock = threading.Lock()
        self._node: tuple[int, ...] | None = None
        self._coords: dict[int, dict[int, tuple[int, ...]]] = {}  # id(mesh) -> rank -> coordinate
        self._digests: dict[str, bytes] = {}  # entry key -> digest of its description
        self._state = shm.Membership()
        self._finalizer = weakref.finalize(self, self._state.leave)
        # Non-blocking: this rank's node and the job's token (the first rank's wins).
        self._node_name = shm.node_name()
        store.set(f"lazysd/share/node/{rank}", self._node_name)
        token = store.compare_set("lazysd/share/job", "", uuid.uuid4().hex)
        self._job = token.decode() if isinstance(token, bytes) else str(token)
        self._identity, self._unshareable = _identities(checkpoint)
        self._published: set[str] = set()  # names this process published: read-ahead must not read them again
        self._taken: set[str] = set()  # names this process took: nor these
        self._ahead_read: set[str] = set()  # read ahead by this process, not taken back yet (no receipt)
        self._live: dict[str, int] = {}  # published by this process, maybe not taken by all yet: bytes
        self._budget: int | None = None
        self._ahead = _ReadAhead(self, entries, dtype_of, ahead_bytes) if entries and dtype_of else None
        # A member from the start: what other ranks publish for this one stays until it closes.
        self._state.join(self._job, self._identity)

    # ---- which ranks need a box ----------------------------------------------------------
    def node(self) -> tuple[int, ...]:
        """Global ranks on this node (that opened a VirtualStateDict with sharing on)."""
        if self._node is None:
            keys = [f"lazysd/share/node/{r}" for r in range(self.world)]
            try:  # ranks open their VirtualStateDicts at about the same time: wait a little
                import datetime

                self.store.wait(keys, datetime.timedelta(seconds=self.membership_seconds))
            except Exception:
                pass  # a rank that has not opened one by now is not counted
            node = []
            for r, key in enumerate(keys):
                try:
                    if self.store.check([key]) and self.store.get(key).decode() == self._node_name:
                        node.append(r)
                except Exception:
                    continue
            self._node = tuple(node) if self.rank in node else (self.rank,)
        return self._node

    def needing(self, entry: Entry, box: Box) -> int:
        """How many ranks of this node hold exactly ``box`` of ``entry`` (this one included)."""
        target = None if self.targets is None else self.targets.target(entry)
        if target is None:
            return len(self.node()) if tuple(box) == full_box(entry.shape) else 1
        coords = self._coordinates(target)
        if coords is None:
            return 1
        shape, mesh_shape = entry.shape, tuple(target.mesh.shape)
        return sum(
            1
            for r in self.node()
            if r in coords and shard_box(shape, mesh_shape, coords[r], target.placements) == tuple(box)
        )

    def boxes(self, entry: Entry, ranks: tuple[int, ...]) -> dict[int, Box]:
        """The box of ``entry`` each of ``ranks`` holds (those outside its mesh left out)."""
        target = None if self.targets is None else self.targets.target(entry)
        if target is None:
            return dict.fromkeys(ranks, full_box(entry.shape))
        coords = self._coordinates(target)
        if coords is None:
            return {}
        mesh_shape = tuple(target.mesh.shape)
        return {r: shard_box(entry.shape, mesh_shape, coords[r], target.placements) for r in ranks if r in coords}

    def _coordinates(self, target: Target) -> dict[int, tuple[int, ...]] | None:
        """Rank -> mesh coordinate, for meshes of ``Shard``/``Replicate`` placements only."""
        if not all(type(p).__name__ in ("Shard", "Replicate") for p in target.placements):
            return None
        mesh = target.mesh
        found = self._coords.get(id(mesh))
        if found is None:
            grid = mesh.mesh
            found = {int(grid[idx]): tuple(int(i) for i in idx) for idx in _indices(tuple(grid.shape))}
            self._coords[id(mesh)] = found
        return found

    # ---- filling -------------------------------------------------------------------------
    def fill(self, entry: Entry, box: Box, dest: torch.Tensor, *, fresh: bool = False) -> torch.Tensor:
        """Write ``box`` of ``entry`` into ``dest``: taken from the node, or read (and published)."""
        if dest.device.type == "meta":
            return dest
        needed = self.needing(entry, box) if not self._unshareable.intersection(_files(entry)) else 1
        where = self._state.join(self._job, self._identity) if needed > 1 else None
        if where is None:
            return self.reader.fill(entry, box, dest, fresh=fresh)
        digest = self._digest(entry, box, dest.dtype, dest.device.type)
        name = os.path.join(where, digest.hex())
        if self._ahead is not None:
            self._ahead.advance(entry.key)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            if self._take(name, digest, dest, entry):
                return dest
            try:
                claim = shm.claim(name)
            except OSError:  # no room or no descriptors for a claim here: read it ourselves
                return self.reader.fill(entry, box, dest, fresh=fresh)
            if claim is not None:
                try:
                    if self._take(name, digest, dest, entry):  # published just before our claim
                        return dest
                    self.reader.fill(entry, box, dest, fresh=fresh)
                    self._publish(name, digest, dest, needed)
                finally:
                    shm.drop_claim(name, claim)
                return dest
            if not shm.await_claim(name, deadline):
                return self.reader.fill(entry, box, dest, fresh=fresh)  # waited long enough

    def _digest(self, entry: Entry, box: Box, dtype: torch.dtype, device_type: str) -> bytes:
        described = self._digests.get(entry.key)
        if described is None:
            described = self._digests[entry.key] = hashlib.sha256(repr(entry).encode()).digest()
        h = hashlib.sha256()
        for part in (self._job, self._identity, described.hex(), repr(tuple(box)), str(dtype), device_type):
            h.update(part.encode() + b"\0")
        return h.digest()

    def _take(self, name: str, digest: bytes, dest: torch.Tensor, entry: Entry) -> bool:
        """Copy the published box ``name`` into ``dest``; False if it is not published (or
        not readable as promised: then ``dest`` is left to be read from storage)."""
        try:
            fd = os.open(name, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        nbytes = dest.numel() * dest.element_size()
        t0 = time.perf_counter()
        try:
            head = os.pread(fd, _HEADER, 0)
            if head[:8] != _MAGIC or head[8:40] != digest or int.from_bytes(head[40:48], "little") != nbytes:
                return False  # not what this name promises: read it ourselves, leave it alone
            shm.read_exact(fd, dest, _HEADER)
            fcntl.flock(fd, fcntl.LOCK_EX)  # the count of ranks that took it
            try:
                needed = int.from_bytes(os.pread(fd, 8, 48), "little")
                took = int.from_bytes(os.pread(fd, 8, 56), "little") + 1
                os.pwrite(fd, took.to_bytes(8, "little"), 56)
                if took >= needed:  # the last one: nobody needs it any more
                    shm.unlink(name)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            return False
        finally:
            os.close(fd)
        with self._lock:
            self._taken.add(name)
            ours = name in self._ahead_read  # read ahead by this process: counted when read
            self._ahead_read.discard(name)
            if not ours:
                self.bytes_received += nbytes
                self.tensors_received += 1
        if not ours:
            # A destination filled, as the reader counts them (stats, progress reports).
            self.reader.count_filled(entry, dest, t0)
        return True

    def _room(self, name: str, nbytes: int) -> bool:
        """Whether this process may publish ``nbytes`` more (and if so, count them).

        What a rank has published and not every rank has taken stays within a quarter of
        the shared-memory filesystem split over the node's ranks: boxes that ranks counted on
        but never take (a subset loaded, an export) cannot fill it.
        """
        with self._lock:
            if self._budget is None:
                try:
                    st = os.statvfs(shm.shm_root())
                    self._budget = st.f_frsize * st.f_blocks // (4 * max(1, len(self.node())))
                except OSError:
                    self._budget = 0
            if sum(self._live.values()) + nbytes > self._budget:
                self._live = {n: b for n, b in self._live.items() if os.path.exists(n)}  # gone: taken by all
                if sum(self._live.values()) + nbytes > self._budget:
                    return False
            self._live[name] = nbytes
            return True

    def _publish(self, name: str, digest: bytes, dest: torch.Tensor, needed: int) -> None:
        """Publish ``dest``'s values (this rank read them and took them already).

        Best effort: without room in shared memory (the space is reserved first, so a full
        ``/dev/shm`` is an error here, never a SIGBUS) the others read it themselves.
        """
        nbytes = dest.numel() * dest.element_size()
        if not self._room(name, nbytes):
            return
        try:
            self._write_box(name, digest, nbytes, needed, lambda fd: shm.write_exact(fd, dest, _HEADER), ahead=False)
        except (OSError, RuntimeError):
            return

    def _write_box(
        self, name: str, digest: bytes, nbytes: int, needed: int, write: Callable[[int], None], *, ahead: bool
    ) -> None:
        """Write a box under a temporary name, then rename: readers see whole boxes only.

        ``write(fd)`` puts the ``nbytes`` of values after the header; ``ahead``: read ahead
        for ranks that will ask (nobody took it yet), else by this rank for itself (taken
        once). On any error the temporary file is removed and the error raised.
        """
        tmp = f"{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.posix_fallocate(fd, 0, _HEADER + max(nbytes, 1))
            write(fd)
            counts = [n.to_bytes(8, "little") for n in (nbytes, needed, 0 if ahead else 1)]  # taken so far
            os.pwrite(fd, _MAGIC + digest + b"".join(counts), 0)
            with self._lock:
                self._published.add(name)
                if ahead:
                    self._ahead_read.add(name)
            os.rename(tmp, name)
        except BaseException:
            shm.unlink(tmp)
            raise
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_published += nbytes

    def _prefetch(self, entry: Entry, box: Box, dtype: torch.dtype, needed: int) -> None:
        """Read a box this rank owns into shared memory before any rank asks (read-ahead):
        straight into the published file's memory (:meth:`_write_box`)."""
        where = self._state.join(self._job, self._identity)
        if where is None:
            return
        digest = self._digest(entry, box, dtype, "cpu")
        name = os.path.join(where, digest.hex())
        if os.path.exists(name) or name in self._taken or name in self._published:
            return
        claim = shm.claim(name)
        if claim is None:
            return  # being read by another rank (or thread)
        try:
            # This process may have asked for it meanwhile: then it is here or was, and gone
            # only once every rank that needs it took it (this one included, so recorded).
            if os.path.exists(name) or name in self._taken or name in self._published:
                return
            shape = [hi - lo for lo, hi in box]
            nbytes = math.prod(shape) * dtype.itemsize
            if not self._room(name, nbytes):
                return

            def fill(fd: int) -> None:
                if nbytes:
                    mapped = mmap.mmap(fd, _HEADER + nbytes)
                    try:
                        dest = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=_HEADER)
                        self.reader.fill(entry, box, dest.view(dtype).view(shape))
                        del dest
                    finally:
                        mapped.close()

            self._write_box(name, digest, nbytes, needed, fill, ahead=True)
        finally:
            shm.drop_claim(name, claim)

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reading ahead and leave the node's directory (the last rank out removes it)."""
        if self._ahead is not None:
            self._ahead.stop()
        self._finalizer()


class _ReadAhead:
    """Read-ahead of the boxes this rank owns (point 5 of the module docstring).

    Positions are the checkpoint's key order; ``starts`` the shared bytes before each
    position, so "the next ``ahead`` bytes of shared boxes" is a subtraction.
    """

    def __init__(
        self, share: NodeShare, entries: Mapping[str, Entry], dtype_of: Callable[[Entry], torch.dtype], ahead: int
    ) -> None:
        self.share, self.entries, self.dtype_of, self.ahead = share, entries, dtype_of, ahead
        self.lock = threading.Lock()
        self.items: list[tuple[int, Entry, Box, int, int]] | None = None  # mine: (position, entry, box, ranks, bytes)
        self.positions: dict[str, int] = {}
        self.starts: list[int] = []  # cumulative shared bytes before each position
        self.anchor = -1
        self.asked = 0
        # Rules (kinds of tensor: q_proj, routed experts, ...) this rank has asked for in their
        # planned box: only those are read ahead. A rank that uses some kind otherwise (slices
        # of experts in an export, a model without them) never has them read ahead for it.
        self.kinds: set[int] = set()
        self.next = 0  # index into items of the next box to consider
        self.workers = 0
        self.max_workers = 1 if share.checkpoint.local else 4  # remote: latency bound, keep requests in flight
        self.stopped = False

    def _build(self) -> None:
        """Every shared box of the node, its owner, and this rank's in checkpoint order."""
        share = self.share
        node = share.node()
        needs: dict[int, list[tuple[str, tuple[tuple[int, int], ...], str, int]]] = {r: [] for r in node}
        where: dict[str, tuple[int, Entry]] = {}
        shared_bytes = [0] * len(self.entries)
        for pos, (key, entry) in enumerate(self.entries.items()):
            self.positions[key] = pos
            if share._unshareable.intersection(_files(entry)):
                continue
            dtype = self.dtype_of(entry)
            for r, box in share.boxes(entry, node).items():
                nbytes = math.prod(hi - lo for lo, hi in box) * dtype.itemsize
                needs[r].append((key, box, str(dtype), nbytes))
            where[key] = (pos, entry)
        items, owner, cost = owners(needs)
        mine = []
        for item, ranks in items:
            pos, entry = where[item[0]]
            shared_bytes[pos] += cost[item]
            if owner[item] == share.rank:
                mine.append((pos, entry, item[1], len(ranks), cost[item]))
        total = 0
        for b in shared_bytes:
            self.starts.append(total)
            total += b
        self.items = sorted(mine, key=lambda m: m[0])

    def advance(self, key: str) -> None:
        """Rank asked for ``key``: read ahead from there (from the second key asked on)."""
        with self.lock:
            if self.stopped:
                return
            entry = self.entries.get(key)
            if entry is not None:
                self.kinds.add(id(entry.rule))
            self.asked += 1
            if self.asked < 2:
                return
            if self.items is None:
                try:
                    self._build()
                except Exception:
                    self.items = []  # no read-ahead; values are still shared on demand
            pos = self.positions.get(key, -1)
            self.anchor = max(self.anchor, pos)
            if self.workers < self.max_workers and self._pending():
                self.workers += 1
                threading.Thread(target=self._work, name="lazysd-readahead", daemon=True).start()

    def _pending(self) -> bool:
        assert self.items is not None
        while self.next < len(self.items) and self.items[self.next][0] <= self.anchor:
            self.next += 1  # asked for already (or passed): read on demand
        if self.next >= len(self.items):
            return False
        pos = self.items[self.next][0]
        return self.starts[pos] - self.starts[max(self.anchor, 0)] <= self.ahead

    def _work(self) -> None:
        while True:
            with self.lock:
                if self.stopped or not self._pending():
                    self.workers -= 1
                    return
                assert self.items is not None
                _, entry, box, needed, _ = self.items[self.next]
                self.next += 1
                if id(entry.rule) not in self.kinds:
                    continue  # not shown to be loaded whole by this rank: on demand only
            try:
                self.share._prefetch(entry, box, self.dtype_of(entry), needed)
            except Exception:
                pass  # a box that cannot be read ahead is read on demand, where its error shows

    def stop(self) -> None:
        with self.lock:
            self.stopped = True


def _identities(checkpoint: Checkpoint) -> tuple[str, set[Any]]:
    """The checkpoint's identity (path and every file's identity) and its files that cannot be
    told apart from a changed version (remote objects without an ETag): never shared."""
    known = checkpoint.file_identities()
    parts, unshareable = [str(checkpoint.path)], set()
    for file in sorted(known, key=str):
        ident = known[file]
        if getattr(ident, "etag", "local") is None:
            unshareable.add(file)
        parts.append(f"{file}={ident!r}")
    return "\n".join(parts), unshareable


def _files(entry: Entry) -> set[Any]:
    files = set()
    for src in entry.sources:
        files.add(src.info.file)
        if src.scale is not None:
            files.add(src.scale.info.file)
    return files


def _indices(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in shape:
        out = [idx + (i,) for idx in out for i in range(n)]
    return out


_Item = tuple[str, tuple[tuple[int, int], ...], str]  # (key, box, dtype)


def owners(
    needs: dict[int, list[tuple[str, tuple[tuple[int, int], ...], str, int]]],
) -> tuple[list[tuple[_Item, list[int]]], dict[_Item, int], dict[_Item, int]]:
    """The items several ranks of a node need (with those ranks), the rank reading each, and its bytes.

    ``needs``: rank -> ``(key, box, dtype, bytes)`` it loads. Largest first onto the least
    loaded rank of those needing it: the same answer on every rank (same inputs), for
    :func:`lazysd.share.share_node` (who reads and sends) and the read-ahead here (who
    reads ahead).

    Example:
        >>> items, owner, _ = owners({0: [("w", ((0, 4),), "bf16", 8)], 1: [("w", ((0, 4),), "bf16", 8)]})
        >>> items, owner[("w", ((0, 4),), "bf16")]
        ([(('w', ((0, 4),), 'bf16'), [0, 1])], 0)
    """
    # (key, box, dtype) -> ranks of this node needing it, and the bytes one read costs.
    wanted: dict[_Item, list[int]] = {}
    cost: dict[_Item, int] = {}
    for r, rank_needs in needs.items():
        for key, box, dtype, read in rank_needs:
            wanted.setdefault((key, box, dtype), []).append(r)
            cost[(key, box, dtype)] = read
    items = sorted((k, v) for k, v in wanted.items() if len(v) > 1)
    load = dict.fromkeys(needs, 0)
    owner: dict[_Item, int] = {}
    for item, ranks in sorted(items, key=lambda kv: (-cost[kv[0]], kv[0])):
        o = min(ranks, key=lambda r: (load[r], r))
        owner[item] = o
        load[o] += cost[item]
    return items, owner, cost


def node_share(
    checkpoint: Checkpoint,
    reader: Reader,
    targets: Targets | None,
    *,
    entries: Mapping[str, Entry] | None = None,
    dtype_of: Callable[[Entry], torch.dtype] | None = None,
) -> NodeShare | None:
    """A :class:`NodeShare` when a default process group of several ranks is up and shared
    memory is usable; None otherwise (a single process never touches shared memory)."""
    if not os.path.isdir(shm.shm_root()) or not os.access(shm.shm_root(), os.W_OK):
        return None
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return None
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
    except Exception:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    return NodeShare(
        checkpoint, reader, targets, rank=rank, world=world, store=store, entries=entries, dtype_of=dtype_of
    )
