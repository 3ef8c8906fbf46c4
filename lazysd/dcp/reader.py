"""DCP ``StorageReader`` over a Hugging Face checkpoint: :class:`HFReader`.

Native keys (or the HF keys unchanged) are described to DCP from the headers; ``read_data``
reads each item's exact byte runs through lazysd's reader. See :mod:`lazysd.dcp`.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
)
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..checkpoint import Checkpoint
from ..errors import MissingKeyError, ShapeMismatchError
from ..fp8 import FP8_DTYPES
from ..geometry import Box
from ..paths import resolve_checkpoint_path
from ..plan import Entry, Source
from ..reader import MiB, Reader, ReadOptions, Stats
from ..rules import Rule
from ..storage import is_remote, open_checkpoint
from ..virtual import VirtualStateDict

_AS_STORED = Rule("{key:**}")  # rule carried by the identity entries of native=False


def _identity_entry(info: Any) -> Entry:
    """An HF tensor as itself: one source, no permutation, no cast."""
    n = len(info.shape)
    return Entry(
        info.key, info.shape, info.dtype, (Source(info=info, start=(0,) * n, dims=tuple(range(n))),), _AS_STORED
    )


def new_id() -> str:
    return str(uuid.uuid4())


class HFReader(StorageReader):
    """A DCP ``StorageReader`` over an HF safetensors checkpoint, reading exact byte ranges.

    Args:
        path: checkpoint directory (``config.json`` + ``*.safetensors`` [+ index]; with
            ``native=False`` config.json is not needed), or the other path forms
            :class:`~lazysd.VirtualStateDict` takes (a ``model.safetensors`` file, a local
            Hugging Face cache repository or repo id, see :mod:`lazysd.paths`).
        native: describe the checkpoint under native keys, shapes and dtypes (True, the
            default: ``dcp.load(model.state_dict(), ...)`` for a native model) or under its HF
            keys unchanged (False: a drop-in for torch's ``HuggingFaceStorageReader``).
        adapter, include_mtp, dtype, fp8: as for :class:`~lazysd.VirtualStateDict`
            (``native=True`` only; with ``native=False`` only ``dtype`` applies).
        revision: branch, tag or commit of a Hugging Face cache repository (default main).
        threads, max_inflight_bytes, chunk_bytes: reader threads (also how many read items
            are read at once), staging memory reads may run ahead of copies, and the target
            size of one read; ``threads`` and ``chunk_bytes`` default to the values chosen for
            this machine and the checkpoint's storage (:mod:`lazysd.tuning`), as for a
            VirtualStateDict.
        storage_options: for a URL (``s3://``, ``https://``, ``hf://`` ...), options of its
            fsspec filesystem (see :class:`~lazysd.VirtualStateDict`).
        **options: further VirtualStateDict options (``native=True``).

    Each ``ReadItem`` DCP's planner hands :meth:`read_data` names one tensor and a box of it
    (``storage_offsets`` + ``lengths``: the region of the checkpoint tensor that one local
    shard needs) and a destination (``planner.resolve_tensor``). The box is read straight into
    the destination, transposes fused into the read as in a VirtualStateDict load: a rank
    holding experts ``[2, 4)`` reads those experts' bytes and nothing else, a ``Shard(1)``
    rank reads its columns as strided runs. Destinations of another dtype are cast as they are
    filled (as DCP's own readers ``copy_``).

    Attributes:
        vsd: the :class:`~lazysd.VirtualStateDict` whose plan describes the native tensors
            (``native=True``), else None.
        checkpoint: the :class:`~lazysd.checkpoint.Checkpoint` read from.

    Example:
        >>> import torch.distributed.checkpoint as dcp                         # doctest: +SKIP
        >>> sd = model.state_dict()          # DTensors from fully_shard / EP   # doctest: +SKIP
        >>> dcp.load(sd, storage_reader=lazysd.dcp.HFReader("/ckpt/Step-3.5-Flash"))  # doctest: +SKIP
        >>> reader = lazysd.dcp.HFReader("/ckpt/Step-3.5-Flash", native=False)  # HF keys  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        native: bool = True,
        adapter: Any = None,
        include_mtp: bool = False,
        dtype: torch.dtype | None = None,
        fp8: str = "dequantize",
        revision: str | None = None,
        threads: int | None = None,
        max_inflight_bytes: int = 32 * MiB,
        chunk_bytes: int | None = None,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._storage_options = storage_options
        self._revision = revision
        if not native and (adapter is not None or include_mtp or fp8 != "dequantize" or options):
            given = [
                n for n, v in (("adapter", adapter), ("include_mtp", include_mtp), ("fp8", fp8 != "dequantize")) if v
            ] + list(options)
            raise TypeError(
                f"HFReader(native=False) reads HF keys as stored; {', '.join(given)} only apply with native=True"
            )
        self.native = native
        self._args = dict(adapter=adapter, include_mtp=include_mtp, dtype=dtype, fp8=fp8, **options)
        self._read_options = ReadOptions(threads, chunk_bytes, max_inflight_bytes)
        self.vsd: Any = None
        self.checkpoint: Checkpoint | None = None
        self._entries: dict[str, Entry] = {}
        self._reader: Reader | None = None
        self._open(path)
        self.load_id = new_id()
        self.is_coordinator = False
        self.rank: int | None = None

    # ---- opening -------------------------------------------------------------------------
    def _open(self, path: str | os.PathLike[str]) -> None:
        self.close()
        if not is_remote(path):
            path = resolve_checkpoint_path(path, revision=self._revision)
        if self.native:
            opts = self._read_options
            self.vsd = VirtualStateDict(
                path,
                threads=opts.threads,
                max_inflight_bytes=opts.max_inflight_bytes,
                chunk_bytes=opts.chunk_bytes,
                storage_options=self._storage_options,
                **self._args,
            )
            self.checkpoint = self.vsd.checkpoint
            self._reader = self.vsd.reader
            self._entries = self.vsd.plan.entries
        else:
            # as torch's reader: no config.json needed
            self.checkpoint = open_checkpoint(path, storage_options=self._storage_options, config_required=False)
            self._reader = Reader(self.checkpoint, self._read_options)
            self._entries = {key: _identity_entry(info) for key, info in self.checkpoint.tensors.items()}
        self.path = self.checkpoint.path

    def _dtype(self, entry: Entry) -> torch.dtype:
        """The dtype a tensor is described (and read) as: after ``dtype=``, as a VirtualStateDict does."""
        if self.vsd is not None:
            return self.vsd.dtype_of(entry)
        cast = self._args["dtype"]
        keep = cast is None or not entry.dtype.is_floating_point or entry.dtype in FP8_DTYPES
        return entry.dtype if keep else cast

    # ---- the StorageReader protocol ------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new load begins; ``checkpoint_id`` (a checkpoint directory) replaces the path."""
        if checkpoint_id is not None and (
            str(checkpoint_id) != str(self.path)
            if is_remote(checkpoint_id)
            else resolve_checkpoint_path(checkpoint_id, revision=self._revision) != self.path
        ):
            self._open(checkpoint_id)
        self.load_id = new_id()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """Keys, shapes and dtypes from the headers: each tensor one chunk, the whole tensor."""
        sd_meta: dict[str, Any] = {}
        storage: dict[MetadataIndex, str] = {}
        for key, entry in self._entries.items():
            zeros = torch.Size([0] * len(entry.shape))
            sd_meta[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=self._dtype(entry)),
                size=torch.Size(entry.shape),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(entry.shape))],
            )
            storage[MetadataIndex(key, zeros)] = key
        return Metadata(
            state_dict_metadata=sd_meta,
            storage_data=storage,
            storage_meta=StorageMeta(checkpoint_id=str(self.path), load_id=self.load_id),
        )

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """This rank's read items in file order (the order of their first source byte)."""

        def where(item: ReadItem) -> tuple[str, int]:
            entry = self._entries.get(item.storage_index.fqn)
            if entry is None:
                return ("", 0)
            info = entry.sources[0].info
            return (str(info.file), info.offset)

        return replace(plan, items=sorted(plan.items, key=where))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item's box into its destination; the returned future is already complete.

        With ``threads`` > 1 several items are read at once, each on one thread (many small
        reads, such as the rows of a column shard, then overlap instead of waiting in turn);
        the planner's ``resolve_tensor``/``commit_tensor`` are called one at a time.
        """
        assert self._reader is not None
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise MissingKeyError(f"{self.path}: {item.storage_index.fqn!r} is not a tensor key of this checkpoint")
            self._entry(item.storage_index.fqn)  # every key known before any read
        workers = min(self._reader.options.threads, len(plan.items))
        reader = self._reader if workers <= 1 else Reader(self._reader.ckpt, replace(self._reader.options, threads=0))
        planner_lock = threading.Lock()

        def read(item: ReadItem) -> None:
            entry = self._entries[item.storage_index.fqn]
            with planner_lock:
                dest = planner.resolve_tensor(item).detach()
            if tuple(dest.shape) != tuple(item.lengths):
                raise ShapeMismatchError(
                    f"{self.path}: {entry.key}: destination {list(dest.shape)} is not the requested region "
                    f"{list(item.lengths)}"
                )
            reader.fill(entry, _box(item), dest)
            with planner_lock:
                planner.commit_tensor(item, dest)

        # Each item is hinted (_prefetch) a few items before it is read, in file order, so the
        # kernel fetches the next ones while these are copied.
        pool = ThreadPoolExecutor(workers, thread_name_prefix="lazysd-dcp") if workers > 1 else None
        pending: deque[Callable[[], None]] = deque()  # started reads (or, inline, reads to do)
        try:
            for item in plan.items:
                self._prefetch(item)
                pending.append(pool.submit(read, item).result if pool is not None else partial(read, item))
                if len(pending) > 2 * max(workers, 1):
                    pending.popleft()()  # the first error is raised
            while pending:
                pending.popleft()()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            reader.close()  # staging buffers go back to the OS between loads
            if reader is not self._reader:
                self._reader.stats.tensors += reader.stats.tensors
                self._reader.stats.bytes_out += reader.stats.bytes_out
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True for a directory holding ``*.safetensors`` files, or a URL (checked when opened)."""
        if is_remote(checkpoint_id):
            return True
        try:
            path = Path(checkpoint_id)
            return path.is_dir() and any(path.glob("*.safetensors"))
        except (OSError, TypeError, ValueError):
            return False

    def _prefetch(self, item: ReadItem) -> None:
        """Ask the kernel to read ahead the span of a box's many small runs, when that costs no extra disk.

        A column shard (``Shard(1)`` of ``[E, out, in]``, FSDP2's split of EP experts) is one
        run per row. Where those runs leave no whole page between them, every page of their
        span is read anyway: one ``WILLNEED`` over the span turns thousands of small cold
        reads into the kernel's large sequential ones (3x faster on a cold cache here), and the
        reads themselves, and the bytes lazysd counts, stay exactly the planned ones.
        """
        assert self._reader is not None
        if not self.checkpoint.local:  # type: ignore[union-attr]  # a kernel hint needs a local file
            return
        by_file: dict[str, list[tuple[int, int]]] = {}
        for file, offset, n in self.planned_ranges([item]):
            by_file.setdefault(file, []).append((offset, n))
        for file, runs in by_file.items():
            if len(runs) > 1 and _pages(runs) == _pages([_span(runs)]):
                start, length = _span(runs)
                fd = self.checkpoint.check_unchanged(Path(file))  # type: ignore[union-attr]
                # The kernel reads at most its readahead window per hint: one hint per window.
                for at in range(start, start + length, _HINT_BYTES):
                    os.posix_fadvise(fd, at, min(_HINT_BYTES, start + length - at), os.POSIX_FADV_WILLNEED)

    # ---- accounting ----------------------------------------------------------------------
    def _entry(self, key: str) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise MissingKeyError(f"{self.path}: no {'native' if self.native else 'HF'} key {key!r} in this checkpoint")
        return entry

    def planned_ranges(self, items: Iterable[ReadItem]) -> list[tuple[str, int, int]]:
        """``(file, offset, length)`` of the bytes :meth:`read_data` reads for ``items``.

        From the plan alone, no I/O; ``bytes_read`` grows by exactly their total.
        """
        assert self._reader is not None
        return [r for item in items for r in self._reader.ranges(self._entry(item.storage_index.fqn), _box(item))]

    @property
    def bytes_read(self) -> int:
        """Tensor bytes this process has read through this reader (headers not counted)."""
        return self.checkpoint.bytes_read if self.checkpoint is not None else 0

    @property
    def stats(self) -> Stats:
        """Read statistics: tensors filled, bytes out, staging peak, seconds."""
        assert self._reader is not None
        return self._reader.stats

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release reader threads and file descriptors; the reader cannot read after this."""
        if self.vsd is not None:
            self.vsd.close()
        elif self._reader is not None:
            self._reader.close()
            self.checkpoint.close()  # type: ignore[union-attr]

    def __enter__(self) -> HFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        what = f"{len(self._entries)} {'native' if self.native else 'HF'} keys"
        return f"HFReader({str(self.path)!r}, {what})"


_PAGE = os.sysconf("SC_PAGE_SIZE")


_HINT_BYTES = 1 << 20  # under any readahead window Linux uses (max of read_ahead_kb and the device's I/O size)


def _span(runs: list[tuple[int, int]]) -> tuple[int, int]:
    """``(start, length)`` from the first byte of ``runs`` to their last."""
    start = min(o for o, _ in runs)
    return start, max(o + n for o, n in runs) - start


def _pages(runs: list[tuple[int, int]]) -> int:
    """How many distinct pages byte ranges ``(offset, length)`` touch.

    Example:
        >>> p = _PAGE
        >>> _pages([(0, 10), (p // 2, 10)]), _pages([(0, 10), (2 * p, 10)])  # gap within a page / a whole page
        (1, 2)
    """
    count, last = 0, -1
    for offset, n in sorted(runs):
        if n <= 0:
            continue
        first, end = max(offset // _PAGE, last + 1), (offset + n - 1) // _PAGE
        if end >= first:
            count += end - first + 1
            last = end
    return count


def _box(item: ReadItem) -> Box:
    return tuple((o, o + n) for o, n in zip(item.storage_offsets, item.lengths, strict=True))
