"""torch.distributed.checkpoint (DCP) storage over Hugging Face safetensors checkpoints.

:class:`HFReader` is a DCP ``StorageReader``: ``dcp.load(state_dict, storage_reader=HFReader(path))``
fills a state dict straight from an HF checkpoint. With ``native=True`` (the default) the
checkpoint is described to DCP under the model's native keys, shapes and dtypes (the plan
lazysd builds from the headers), so a native model's ``state_dict()`` — plain tensors or
DTensors with any mix of ``Shard(d)`` and ``Replicate`` — loads with DCP's own planners, no
``to_hf``/``from_hf`` round trip, each rank reading only the bytes of its shards. With
``native=False`` it is described under the HF keys unchanged: a drop-in for torch's
``HuggingFaceStorageReader`` that reads exact byte ranges instead of whole files.

:class:`HFWriter` is a DCP ``StorageWriter``: ``dcp.save(native_state_dict,
storage_writer=HFWriter(out, adapter="step3p5"))`` writes an HF checkpoint (shards, index,
config) byte-identical to :func:`lazysd.save_hf` of the same state, each rank writing only the
shards DCP's planner gives it.

How DCP drives a reader (every rank unless noted)::

    reset(checkpoint_id)          only when dcp.load is given checkpoint_id=
    read_metadata()               native (or HF) keys, shapes, dtypes: headers only
    set_up_storage_reader(...)    remembers the metadata
    prepare_local_plan(plan)      sorts this rank's read items into file order
    prepare_global_plan(plans)    coordinator only; plans unchanged
    read_data(plan, planner)      each ReadItem: the box storage_offsets + lengths of one
                                  tensor, read into planner.resolve_tensor(item)

Example:
    >>> import tempfile, torch
    >>> import torch.distributed.checkpoint as dcp
    >>> from lazysd.testing import Step3p5Model, Step3p5Spec, make_checkpoint
    >>> src = make_checkpoint(tempfile.mkdtemp(), Step3p5Spec.tiny())
    >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    >>> sd = model.state_dict()
    >>> dcp.load(sd, storage_reader=HFReader(src))      # single process: no_dist
    >>> model.load_state_dict(sd)
    <All keys matched successfully>
"""

from __future__ import annotations

import os
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
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
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .adapters import resolve_adapter
from .checkpoint import Checkpoint
from .errors import ExportError, MissingKeyError, ShapeMismatchError
from .export import (
    ExportLock,
    FileLayout,
    HFEntry,
    HFView,
    Stage,
    clip,
    fitted_config,
    out_dir_problem,
    parse_size,
    piece_blocks,
    plan_files,
    recover,
)
from .export.config import config_layers
from .fp8 import FP8_DTYPES
from .geometry import Box
from .paths import resolve_checkpoint_path
from .plan import Entry, Source
from .reader import MiB, Reader, ReadOptions, Stats
from .rules import Adapter, Rule
from .storage import is_remote, open_checkpoint
from .virtual import VirtualStateDict

__all__ = ["HFReader", "HFWriter"]

_AS_STORED = Rule("{key:**}")  # rule carried by the identity entries of native=False


def _identity_entry(info: Any) -> Entry:
    """An HF tensor as itself: one source, no permutation, no cast."""
    n = len(info.shape)
    return Entry(info.key, info.shape, info.dtype, (Source(info=info, start=(0,) * n, dims=tuple(range(n))),), _AS_STORED)


def _new_id() -> str:
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
            size of one read.
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
        threads: int = 2,
        max_inflight_bytes: int = 32 * MiB,
        chunk_bytes: int = 8 * MiB,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._storage_options = storage_options
        self._revision = revision
        if not native and (adapter is not None or include_mtp or fp8 != "dequantize" or options):
            given = [n for n, v in (("adapter", adapter), ("include_mtp", include_mtp), ("fp8", fp8 != "dequantize")) if v] + list(options)
            raise TypeError(f"HFReader(native=False) reads HF keys as stored; {', '.join(given)} only apply with native=True")
        self.native = native
        self._args = dict(adapter=adapter, include_mtp=include_mtp, dtype=dtype, fp8=fp8, **options)
        self._read_options = ReadOptions(threads, chunk_bytes, max_inflight_bytes)
        self.vsd: Any = None
        self.checkpoint: Checkpoint | None = None
        self._entries: dict[str, Entry] = {}
        self._reader: Reader | None = None
        self._open(path)
        self.load_id = _new_id()
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
            str(checkpoint_id) != str(self.path) if is_remote(checkpoint_id) else resolve_checkpoint_path(checkpoint_id, revision=self._revision) != self.path
        ):
            self._open(checkpoint_id)
        self.load_id = _new_id()

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
        return Metadata(state_dict_metadata=sd_meta, storage_data=storage, storage_meta=StorageMeta(checkpoint_id=str(self.path), load_id=self.load_id))

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
        workers = min(self._read_options.threads, len(plan.items))
        reader = self._reader if workers <= 1 else Reader(self._reader.ckpt, replace(self._read_options, threads=0))
        planner_lock = threading.Lock()

        def read(item: ReadItem) -> None:
            entry = self._entries[item.storage_index.fqn]
            with planner_lock:
                dest = planner.resolve_tensor(item).detach()
            if tuple(dest.shape) != tuple(item.lengths):
                raise ShapeMismatchError(
                    f"{self.path}: {entry.key}: destination {list(dest.shape)} is not the requested region {list(item.lengths)}"
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


# ---- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SaveLayout:
    """What the coordinator decides in ``prepare_global_plan``, sent to every rank.

    Every rank derives the same HF entries and file layout from it (:meth:`HFWriter._job`),
    so only keys, shapes and dtypes travel, never tensors.
    """

    out_dir: str  # the real output directory (symlinks resolved): the stage is its sibling
    token: str  # names this save's staging directory
    natives: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # native key, shape, dtype; export order
    world: int  # ranks taking part (DCP's plans)


@dataclass(frozen=True)
class _Job:
    entries: dict[str, list[HFEntry]]  # native key -> its HF entries
    layout: FileLayout


def _box_of_write(item: WriteItem) -> Box:
    """The region of its tensor a write item holds (a DTensor's local shard, or all of it)."""
    td = item.tensor_data
    assert td is not None
    if item.type == WriteItemType.SHARD:
        return tuple((o, o + n) for o, n in zip(td.chunk.offsets, td.chunk.sizes, strict=True))
    return tuple((0, n) for n in td.size)


class HFWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes a native state dict as a Hugging Face checkpoint.

    ``dcp.save(model.state_dict(), storage_writer=HFWriter(out, adapter="step3p5"))`` writes
    ``model-0000i-of-0000N.safetensors`` shards (HF keys, the adapter's rules run backwards),
    ``model.safetensors.index.json`` and, given ``config``, ``config.json``: byte for byte what
    :func:`lazysd.save_hf` writes for the same state, through the same export phases
    (:mod:`lazysd.export`). DCP's planner decides which rank writes what (each DTensor's local
    shard; each replicated value once); every rank writes its items' bytes straight to their
    offsets in the shared staged files, so nothing is gathered.

    The phases, in DCP's order::

        prepare_local_plan   every rank: the output directory is usable; its keys in order
        prepare_global_plan  coordinator: take the export lock, keys/shapes/dtypes -> file
                             layout, create the staged files (headers, final sizes)
        write_data           every rank: write its items' HF bytes, fsync; then every rank
                             learns whether any failed (the coordinator aborts if so)
        finish               coordinator: every byte written exactly once? commit (index,
                             config.json, one atomic rename), release the lock

    As with ``save_hf``, the output directory always holds the old export or the new one: a
    failed or killed ``dcp.save`` leaves only a hidden ``.<name>.lazysd-stage-*`` sibling,
    removed by the next export into it. The files are laid out in the order of the keys in
    the coordinator's state dict (keys only other ranks hold follow), which for a model's
    ``state_dict()`` is ``save_hf``'s order.

    Args:
        path: output directory; created if missing, refused if it holds files (unless
            ``overwrite``).
        adapter: model family (an Adapter or a registered name) whose rules map native keys
            back to HF keys.
        config: a dict written as config.json, or the path of a config.json to copy (fitted
            to what is written, as ``save_hf`` fits it).
        max_shard_size: bytes per file, an int or a string like ``"5GB"``.
        dtype: cast floating-point tensors (rule-pinned dtypes such as the fp32 router bias
            keep theirs).
        num_layers: main decoder layers, to number ``mtp.layers.{i}`` back to
            ``model.layers.*``; by default read from ``config``.
        overwrite: replace the weights of a non-empty ``path`` (other files stay).

    Example:
        >>> import tempfile, torch.distributed.checkpoint as dcp
        >>> from lazysd.testing import Step3p5Model, Step3p5Spec
        >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
        >>> out = tempfile.mkdtemp() + "/hf"
        >>> _ = dcp.save(model.state_dict(), storage_writer=HFWriter(out, adapter="step3p5"), no_dist=True)
        >>> sorted(p.name for p in Path(out).iterdir())
        ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        adapter: Adapter | str,
        config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
        num_layers: int | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__()
        self.adapter = resolve_adapter(adapter, {})
        if config is not None and not isinstance(config, Mapping) and not Path(config).is_file():
            raise ExportError(f"config {config}: not a file; pass a dict or the path of a config.json")
        self.config = config
        self.num_layers = num_layers
        parse_size(max_shard_size)  # a bad size fails here, not in the middle of a save
        self.max_shard_size = max_shard_size
        self.dtype = dtype
        self.overwrite = overwrite
        self.bytes_written = 0  # tensor bytes this rank wrote in the last save
        self.is_coordinator = False
        self.rank: int | None = None
        self._set_path(path)
        # Coordinator only, from prepare_global_plan to finish:
        self._lock: ExportLock | None = None
        self._stage: Stage | None = None
        self._config_bytes: bytes | None = None
        self._cached: tuple[_SaveLayout, _Job] | None = None

    def _set_path(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.save_id = _new_id()

    # ---- the StorageWriter protocol ------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save begins; ``checkpoint_id`` (a directory) replaces the output path."""
        self._release()  # what a save that failed before finish() still holds
        self._set_path(self.path if checkpoint_id is None else checkpoint_id)
        self.bytes_written = 0

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id=self.save_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Refuse non-tensor values and an unusable output directory; note this rank's key order."""
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise ExportError(f"{self.path}: {item.index.fqn!r} is not a tensor; an HF checkpoint holds tensors only")
        problem = out_dir_problem(self.path, [], self.overwrite)
        if problem is not None:
            raise ExportError(problem)
        return replace(plan, storage_data=list(dict.fromkeys(item.index.fqn for item in plan.items)))

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Lay out the files from every rank's keys, shapes and dtypes; lock and create the stage."""
        self._release()
        meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for plan in plans:
            for item in plan.items:
                td = item.tensor_data
                assert td is not None
                found = (tuple(td.size), td.properties.dtype)
                if meta.setdefault(item.index.fqn, found) != found:
                    raise ExportError(f"{self.path}: ranks disagree on {item.index.fqn!r}: {meta[item.index.fqn]} vs {found}")
        order = [key for plan in plans for key in (plan.storage_data or [])]
        natives = tuple((key, *meta[key]) for key in dict.fromkeys(order) if key in meta)
        if not natives:
            raise ExportError(f"{self.path}: nothing to export, the state dict is empty")
        real = Path(os.path.realpath(self.path))
        layout = _SaveLayout(str(real), f"{os.getpid()}-{secrets.token_hex(4)}", natives, len(plans))
        job = self._job(layout)  # unclaimed keys and bad shapes fail here, before anything is made
        config = None
        if self.config is not None:
            entries = [e for group in job.entries.values() for e in group]
            config = fitted_config(self.config, entries, adapter=self.adapter, num_layers=self.num_layers, dtype=self.dtype)
        lock = ExportLock(real)
        lock.__enter__()
        self._lock = lock
        try:
            recover(real)
            self._stage = Stage(real, job.layout, layout.token)
            self._stage.create()
        except BaseException:
            self._release()
            raise
        self._config_bytes = config
        return [replace(plan, storage_data=layout) for plan in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items into the staged files; the future is already complete.

        After writing, the ranks agree on whether any failed (:func:`_any_failed`): on a
        failure anywhere the coordinator removes the stage and releases the export lock, and
        every rank raises, so nothing is committed.
        """
        layout: _SaveLayout = plan.storage_data
        job = self._job(layout)
        stage = self._stage if self._stage is not None else Stage(Path(layout.out_dir), job.layout, layout.token)
        results: list[WriteResult] = []
        failed: BaseException | None = None
        try:
            for item in plan.items:
                box = _box_of_write(item)
                origin = tuple(lo for lo, _ in box)
                tensor = planner.resolve_data(item)
                assert isinstance(tensor, torch.Tensor)
                tensor = tensor.detach()
                wrote = 0
                for entry in job.entries[item.index.fqn]:
                    piece, hf_offset = clip(entry.piece, box)
                    if 0 in piece.shape:
                        continue  # this shard misses the piece
                    for offset, block in piece_blocks(tensor, entry, piece, hf_offset, origin):
                        wrote += stage.write(entry.key, offset, block)
                results.append(WriteResult(index=item.index, size_in_bytes=wrote, storage_data=item.index.fqn))
            stage.flush()
        except BaseException as e:  # noqa: BLE001 - every rank must learn of it before anyone commits
            failed = e
        try:
            anyone_failed = _any_failed(layout.world, failed is not None)
        except BaseException as e:  # noqa: BLE001 - a rank died: no agreement, so no commit
            anyone_failed, failed = True, failed or e
        if anyone_failed:
            if self.is_coordinator:
                self._release()
            elif failed is not None:
                stage.abort()  # where the ranks cannot agree, the failing one removes the stage itself
            else:
                stage.close()
            if failed is not None:
                raise failed
            raise ExportError(f"{self.path}: another rank failed to write its part of the save; nothing was committed")
        self.bytes_written = sum(r.size_in_bytes for r in results)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit: every byte written exactly once, then the index and config.json, atomically."""
        assert self._stage is not None and self._cached is not None, "finish() without prepare_global_plan()"
        try:
            total = self._cached[1].layout.total_size
            written = sum(r.size_in_bytes for rank in results for r in rank)
            if written != total:
                raise ExportError(
                    f"{self.path}: the ranks wrote {written} bytes of {total}; some values were "
                    f"{'written twice' if written > total else 'not written'} (is every rank part of every DTensor mesh?)"
                )
            self._stage.commit(config=self._config_bytes, overwrite=self.overwrite)
            self._stage = None
        finally:
            self._release()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """True for a directory path, existing or not (never for a file)."""
        try:
            return not Path(checkpoint_id).is_file()
        except (OSError, TypeError, ValueError):
            return False

    @property
    def checkpoint_id(self) -> str | os.PathLike[str]:
        return self.path

    # ---- helpers -------------------------------------------------------------------------
    def _job(self, layout: _SaveLayout) -> _Job:
        """HF entries and file layout of ``layout``: the same on every rank, as save_hf plans them."""
        if self._cached is not None and self._cached[0] == layout:
            return self._cached[1]
        shapes = {key: torch.empty(shape, dtype=dtype, device="meta") for key, shape, dtype in layout.natives}
        view = HFView(shapes, adapter=self.adapter, num_layers=self.num_layers if self.num_layers is not None else self._config_layers(), dtype=self.dtype)
        entries: dict[str, list[HFEntry]] = {}
        for e in view.entries.values():
            entries.setdefault(e.native_key, []).append(e)
        job = _Job(entries, plan_files([(e.key, e.dtype, e.shape) for e in view.entries.values()], self.max_shard_size))
        self._cached = (layout, job)
        return job

    def _config_layers(self) -> int | None:
        return None if self.config is None else config_layers(self.config, self.adapter)

    def _release(self) -> None:
        """Coordinator: remove an uncommitted stage and release the export lock (idempotent)."""
        if self._stage is not None:
            self._stage.abort()
            self._stage = None
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __repr__(self) -> str:
        return f"HFWriter({str(self.path)!r}, adapter={self.adapter.name!r})"


def _any_failed(world: int, failed: bool) -> bool:
    """Whether any rank of the save failed, where the ranks can tell each other.

    DCP does not hand its process group to storage writers: the default group is used when
    the save spans all of it, from the main thread (an ``async_save`` thread must not start
    collectives beside the training loop's). Elsewhere each rank knows only its own failure;
    DCP then still skips ``finish``, so nothing is committed either way.
    """
    import torch.distributed as dist

    if world <= 1 or not dist.is_initialized() or dist.get_world_size() != world or threading.current_thread() is not threading.main_thread():
        return failed
    flags: list[Any] = [None] * world
    dist.all_gather_object(flags, failed)  # an object collective: works over NCCL and gloo alike
    return any(flags)
