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
from collections.abc import Iterable
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

from .checkpoint import Checkpoint
from .errors import MissingKeyError, ShapeMismatchError
from .fp8 import FP8_DTYPES
from .geometry import Box
from .plan import Entry, Source
from .reader import MiB, Reader, ReadOptions, Stats
from .rules import Rule
from .storage import is_remote, open_checkpoint

__all__ = ["HFReader"]

_AS_STORED = Rule("{key:**}")  # rule carried by the identity entries of native=False


def _identity_entry(info: Any) -> Entry:
    """An HF tensor as itself: one source, no permutation, no cast."""
    n = len(info.shape)
    return Entry(info.key, info.shape, info.dtype, (Source(info=info, start=(0,) * n, dims=tuple(range(n))),), _AS_STORED)


def _new_load_id() -> str:
    import uuid

    return str(uuid.uuid4())


class HFReader(StorageReader):
    """A DCP ``StorageReader`` over an HF safetensors checkpoint, reading exact byte ranges.

    Args:
        path: checkpoint directory (``config.json`` + ``*.safetensors`` [+ index]); the same
            path forms :class:`~lazysd.VirtualStateDict` takes.
        native: describe the checkpoint under native keys, shapes and dtypes (True, the
            default: ``dcp.load(model.state_dict(), ...)`` for a native model) or under its HF
            keys unchanged (False: a drop-in for torch's ``HuggingFaceStorageReader``).
        adapter, include_mtp, dtype, fp8: as for :class:`~lazysd.VirtualStateDict`
            (``native=True`` only; with ``native=False`` only ``dtype`` applies).
        threads, max_inflight_bytes, chunk_bytes: reader threads, staging memory reads may
            run ahead of copies, and the target size of one read.
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
        threads: int = 2,
        max_inflight_bytes: int = 32 * MiB,
        chunk_bytes: int = 8 * MiB,
        storage_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self._storage_options = storage_options
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
        self.load_id = _new_load_id()
        self.is_coordinator = False
        self.rank: int | None = None

    # ---- opening -------------------------------------------------------------------------
    def _open(self, path: str | os.PathLike[str]) -> None:
        self.close()
        if self.native:
            from .virtual import VirtualStateDict

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
            self.checkpoint = open_checkpoint(path, storage_options=self._storage_options)
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
        if checkpoint_id is not None and str(checkpoint_id if is_remote(checkpoint_id) else Path(checkpoint_id).absolute()) != str(self.path):
            self._open(checkpoint_id)
        self.load_id = _new_load_id()

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

        return LoadPlan(sorted(plan.items, key=where), plan.storage_data, plan.planner_data)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item's box into its destination; the returned future is already complete."""
        assert self._reader is not None
        try:
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    raise MissingKeyError(f"{self.path}: {item.storage_index.fqn!r} is not a tensor key of this checkpoint")
                entry = self._entry(item.storage_index.fqn)
                box = _box(item)
                dest = planner.resolve_tensor(item).detach()
                if tuple(dest.shape) != tuple(item.lengths):
                    raise ShapeMismatchError(
                        f"{self.path}: {entry.key}: destination {list(dest.shape)} is not the requested region {list(item.lengths)}"
                    )
                self._reader.fill(entry, box, dest)
                planner.commit_tensor(item, dest)
        finally:
            self._reader.close()  # staging buffers go back to the OS between loads
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


def _box(item: ReadItem) -> Box:
    return tuple((o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
