"""VirtualStateDict: a read-only Mapping of native keys over an HF safetensors checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from . import dryrun, inspect
from .adapters import resolve_adapter
from .checkpoint import Checkpoint
from .distributed import Targets, as_dtensor, mesh_device
from .errors import MissingKeyError, OptionError
from .fp8 import FP8_DTYPES
from .geometry import Box, full_box
from .lazy import LazyTensor
from .nodeshare import NodeShare, node_share
from .plan import Entry, Plan, resolve
from .progress import ProgressPrinter
from .reader import MiB, Reader, ReadOptions, Stats
from .reads import Destination, ReadItem, ReadTotals, read_totals
from .rules import Adapter
from .storage import RemoteOptions, open_checkpoint

if TYPE_CHECKING:
    from .dryrun import Explanation, LoadPlan
    from .inspect import Selection, Summary


class VirtualStateDict(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors under the model's native names, read only when used.

    Constructing it reads ``config.json``, the index and the safetensors headers — no tensor
    bytes. Keys, ``len``, ``in`` and iteration (natural order: ``layers.2`` before
    ``layers.10``) never read tensor data; values are :class:`~lazysd.lazy.LazyTensor` s that
    know their shape and dtype and read exactly their own bytes when torch copies them.

    Args:
        path: checkpoint directory (``config.json`` + ``*.safetensors`` [+ index]).
        mesh: optional ``DeviceMesh``: routed-expert tensors become DTensors sharded
            ``Shard(0)`` over its expert-parallel dim, each rank reading only its experts.
        like: a module or state dict whose DTensor parameters give the mesh and placements
            to mirror, key by key.
        adapter: model family (an :class:`~lazysd.rules.Adapter` or a registered name);
            detected from config.json's ``model_type`` when omitted.
        include_mtp: also expose multi-token-prediction layers (layer index >=
            ``num_hidden_layers``), as ``mtp.layers.{i}.*`` with ``i`` counted from 0.
        dtype: cast floating-point tensors to this dtype when read (tensors a rule pins,
            like the fp32 router correction bias, keep their dtype).
        fp8: block-scaled FP8 weights (DeepSeek-V3 ``weight`` + ``weight_scale_inv``):
            ``"dequantize"`` (default) reads them as ``dtype`` (bf16 when not given),
            multiplying in only the scale blocks a read needs; ``"keep"`` exposes the FP8
            tensor unchanged plus its fp32 scales under ``<native key>_scale_inv``.
        device: device of materialized values (``load_state_dict`` writes into the
            parameter's own device whatever this says).
        threads: reader threads; ``max_inflight_bytes``: staging memory reads may run
            ahead of copies; ``chunk_bytes``: target size of one read. ``threads`` and
            ``chunk_bytes`` default to values chosen for this machine and the checkpoint's
            storage (:mod:`lazysd.tuning`: as many threads as cores the process may use).
        progress: a callable ``(stats, entry)`` called after each tensor, or True to print
            a one-line progress report to stderr.
        ep_dim: the mesh dimension (name or index) that splits the experts; default the
            one named "ep", or the only dimension of a 1-D mesh.
        replicate: with a mesh, return non-expert tensors as ``Replicate`` DTensors
            instead of plain tensors.
        mmap: materialize tensors that need no conversion as copy-on-write views of the
            file mapping (zero-copy, pages read on first touch) instead of reading them
            into private memory. Makes ``assign=True`` loads much cheaper; the price is
            that such views stay tied to the files: a file truncated under one faults
            (SIGBUS) instead of raising :class:`~lazysd.errors.FileChangedError`, and a
            file rewritten in place (same inode: ``cp`` over it, ``rsync --inplace``,
            a writer opening it ``r+b``) changes the values of the loaded parameters in
            the pages not yet written to (a private mapping isolates your writes from
            the file, not the file's later writes from you). Replace checkpoint files by
            rename (a new inode), as ``save_hf`` and ``huggingface_hub`` do, while a model
            loaded with ``mmap=True`` is in use. Off by default (local files only).
        direct: read bulk ranges that are not in the page cache with ``O_DIRECT``, in large
            requests that keep the storage busy and leave the page cache alone
            (:mod:`lazysd.pread`); warm bytes always come from the page cache. False: plain
            ``pread`` only.
        revision: with a Hugging Face cache repository or hub id as ``path`` (or, with
            ``remote=True`` or an ``hf://`` URL, on the Hub): the branch, tag or commit
            (default ``main``).
        storage_options: for a URL path (``s3://``, ``gs://``, ``https://``, ``hf://``),
            keyword arguments of its fsspec filesystem: credentials, ``endpoint_url``, ...
            (see :mod:`lazysd.storage.remote`; needs ``pip install lazysd[remote]``).
        remote: True reads a Hub repo id (``"org/name"``) from the Hub by ranged GETs,
            like ``"hf://org/name"``; a :class:`~lazysd.storage.RemoteOptions` also tunes
            the requests (in flight, coalescing gap, retries, timeouts).
        share: with a process group of several ranks, ``"node"`` (default) reads each box
            that several ranks of a node need once on that node: values
            (``model.load_state_dict(vsd)``, ``.materialize()``) meet in shared memory
            (:mod:`lazysd.nodeshare`; no collective, any order, any subset of keys), and
            :func:`lazysd.load` sends boxes point-to-point (:mod:`lazysd.share`).
            ``vsd.bytes_read`` / ``vsd.bytes_received`` say what this rank read and took.
            None reads everything on every rank. A single process never shares.

    Paths: ``path`` may be a directory, ``~/...``, the ``model.safetensors`` file of a
    single-file checkpoint, a Hugging Face hub cache repository (``models--org--name``) or a
    hub id (``org/name``) looked up in the local cache (offline, nothing is downloaded; see
    :mod:`lazysd.paths`). With ``adapter=`` given, ``config.json`` is optional.

    Values refuse in-place operations (:class:`~lazysd.errors.ReadOnlyTensorError`): call
    ``.materialize()`` for a tensor of your own. Processes forked after use (e.g.
    ``DataLoader(num_workers>0)``) get their own reader threads.

    Example:
        >>> from lazysd import VirtualStateDict
        >>> vsd = VirtualStateDict("/ckpt/Step-3.5-Flash")            # doctest: +SKIP
        >>> vsd["model.layers.3.moe.experts.gate_and_up_projs"].shape  # doctest: +SKIP
        torch.Size([288, 4096, 2560])
        >>> model.load_state_dict(vsd)                                 # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mesh: Any = None,
        *,
        like: Any = None,
        adapter: Adapter | str | None = None,
        include_mtp: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        max_inflight_bytes: int = 32 * MiB,
        chunk_bytes: int | None = None,
        progress: bool | Callable[[Stats, Entry], None] = False,
        ep_dim: str | int | None = None,
        replicate: bool = False,
        fp8: str = "dequantize",
        mmap: bool = False,
        revision: str | None = None,
        direct: bool = True,
        storage_options: dict[str, Any] | None = None,
        remote: bool | RemoteOptions = False,
        share: str | None = "node",
    ) -> None:
        if share not in ("node", None):
            raise OptionError(f"share must be 'node' or None, got {share!r}")
        self.share = share
        self.checkpoint = _open(path, storage_options, remote, revision, config_required=adapter is None, mmap=mmap)
        if not self.checkpoint.local:
            # Latency, not the CPU, bounds remote reads: keep more requests in flight.
            threads = max(threads or 0, 8)
        self.reader = Reader(self.checkpoint, ReadOptions(threads, chunk_bytes, max_inflight_bytes, mmap, direct))
        try:
            ckpt = self.checkpoint
            where = str(ckpt.path / "config.json")
            self.adapter = resolve_adapter(adapter, ckpt.config, keys=ckpt.tensors, where=where)
            self.plan: Plan = resolve(
                self.adapter,
                ckpt.config,
                ckpt.tensors,
                where=ckpt.path,
                include_mtp=include_mtp,
                fp8=fp8,
                fp8_dtype=dtype or torch.bfloat16,  # type: ignore[arg-type]
            )
            self.dtype = dtype
            self.device = torch.device(device)
            self._targets: Targets | None = None
            if mesh is not None or like is not None:
                where, entries = str(ckpt.path), self.plan.entries
                self._targets = Targets.build(entries, where, mesh=mesh, like=like, ep_dim=ep_dim, replicate=replicate)
            if progress is True:
                # Per key, in the unit the reader counts (bytes written into destinations),
                # from the read plans of this rank's boxes: each key counted once per load.
                sizes = {k: self._totals(k).dest_bytes for k in self.plan.entries}
                self.reader.progress = ProgressPrinter(0, sizes=sizes)
            elif callable(progress):
                self.reader.progress = progress
            self.reader.own = self._own_boxes
            self._nodeshare: NodeShare | None = None
            if share == "node":
                # Read-ahead (into shared memory) only for values that live on the CPU.
                cpu = self.device.type == "cpu" and (mesh is None or getattr(mesh, "device_type", "cpu") == "cpu")
                entries = self.plan.entries if cpu else None
                self._nodeshare = node_share(
                    self.checkpoint, self.reader, self._targets, entries=entries, dtype_of=self.dtype_of
                )
        except BaseException:
            # Not left to the garbage collector: the exception's traceback keeps this frame
            # (and so the descriptors) alive for as long as it is referenced (Jupyter keeps
            # the last one).
            self.close()
            raise

    # ---- Mapping -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.plan.entries.get(key)
        if entry is None:
            raise MissingKeyError(self._missing_message(key))
        if self._targets is None:
            return self.lazy(entry, full_box(entry.shape))
        box, target = self._targets.place(entry)
        if target is None:
            return self.lazy(entry, box)
        return as_dtensor(self.lazy(entry, box, device=mesh_device(target.mesh, self.device)), target, entry.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.plan.entries)

    def __len__(self) -> int:
        return len(self.plan.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.plan.entries

    # ---- metadata ------------------------------------------------------------------------
    def entry(self, key: str) -> Entry:
        """The plan entry of a native key: shape, dtype, HF sources, files and offsets."""
        try:
            return self.plan.entries[key]
        except KeyError:
            raise MissingKeyError(self._missing_message(key)) from None

    def dtype_of(self, entry: Entry) -> torch.dtype:
        """Dtype a native tensor has when read, after the ``dtype=`` cast."""
        # FP8 kept as stored (fp8="keep") is only meaningful with its scales: never cast it.
        if (
            self.dtype is None
            or entry.rule.dtype is not None
            or not entry.dtype.is_floating_point
            or entry.dtype in FP8_DTYPES
        ):
            return entry.dtype
        return self.dtype

    def lazy(self, entry: Entry, box: Box, *, device: torch.device | None = None) -> LazyTensor:
        """A LazyTensor for ``box`` of ``entry`` (on ``device``, default the mapping's)."""
        value = LazyTensor(entry, self.reader, box, dtype=self.dtype_of(entry), device=device or self.device)
        value._share = self._nodeshare
        return value

    def local_box(self, key: str) -> Box:
        """This rank's box of native ``key``: its shard under the mesh/``like=``, else the whole tensor."""
        entry = self.entry(key)
        return full_box(entry.shape) if self._targets is None else self._targets.place(entry)[0]

    def read_items(self, key: str) -> tuple[ReadItem, ...]:
        """The read items of native ``key`` on this rank (:mod:`lazysd.reads`): which bytes of
        which file go into which region, when its value is materialized. No I/O.

        Example:
            >>> [(i.source.key, i.source_box) for i in vsd.read_items("model.norm.weight")]  # doctest: +SKIP
            [('model.norm.weight', ((0, 4096),))]
        """
        entry, box = self.entry(key), self.local_box(key)
        return self.reader.plan(entry, box, self._destination(entry, box))

    def planned_ranges(self, keys: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
        """``(file, offset, length)`` of the bytes that reading ``keys`` (default: all) reads on this rank.

        From the read items alone (:meth:`read_items`), no I/O: lazysd's own per-rank byte
        accounting, which ``bytes_read`` matches after materializing the values.
        """
        return [r for key in (self if keys is None else keys) for item in self.read_items(key) for r in item.ranges()]

    def _own_boxes(self) -> list[tuple[Entry, Box]]:
        """Every key's entry and box on this rank: what its values read."""
        return [(entry, self.local_box(key)) for key, entry in self.plan.entries.items()]

    def _destination(self, entry: Entry, box: Box) -> Destination:
        return self.reader.destination(entry, box, self.dtype_of(entry), self.device)

    def _totals(self, key: str) -> ReadTotals:
        entry, box = self.entry(key), self.local_box(key)
        chunk, shares = self.reader.options.chunk_bytes, self.reader.shares
        return read_totals(entry, box, self._destination(entry, box), chunk_bytes=chunk, shares=shares)

    @property
    def stats(self) -> Stats:
        """Read statistics: tensors filled, bytes out, staging peak, seconds."""
        return self.reader.stats

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from storage so far by this process (headers not counted)."""
        return self.checkpoint.bytes_read

    @property
    def bytes_received(self) -> int:
        """Tensor bytes this process took from other ranks of its node instead of reading
        them (``share="node"``: :mod:`lazysd.nodeshare` for values, :mod:`lazysd.share` for
        :func:`lazysd.load`'s own counter, ``LoadReport.bytes_received``)."""
        return 0 if getattr(self, "_nodeshare", None) is None else self._nodeshare.bytes_received

    def _missing_message(self, key: object) -> str:
        where = f"{self.checkpoint.path}: no native key {key!r}"
        if isinstance(key, str):
            if key in self.plan.ignored:
                return f"{where} ({self.plan.ignored[key]})"
            users = [e.key for e in self.plan.entries.values() if key in e.hf_keys]
            if users:
                return f"{where}; {key!r} is an HF key, read through native key {users[0]!r}"
        return f"{where} ({len(self)} native keys; see .keys())"

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release reader threads and file descriptors (and leave the node's shared memory)."""
        if getattr(self, "_nodeshare", None) is not None:
            self._nodeshare.close()
        self.reader.close()
        self.checkpoint.close()

    def __enter__(self) -> VirtualStateDict:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return inspect.summary_text(self)

    # ---- inspection (metadata only; the work is in lazysd.inspect) -----------------------
    def _repr_html_(self) -> str:
        return inspect.summary_html(self)

    def select(
        self,
        pattern: str | None = None,
        *,
        regex: str | None = None,
        layer: int | str | Iterable[int | str] | None = None,
        kind: str | Iterable[str] | None = None,
    ) -> Selection:
        """Keys matching a glob, a regex, layer(s) and/or module kind(s), as a read-only Mapping.

        Example:
            >>> vsd.select("*.experts.*", layer=3).keys()                  # doctest: +SKIP
        """
        return inspect.select(self, pattern, regex=regex, layer=layer, kind=kind)

    def summarize(self, by: str | tuple[str, ...] = "kind") -> Summary:
        """Keys, parameters and bytes per ``"layer"``, ``"kind"`` or both (``("layer", "kind")``)."""
        return inspect.summarize(self, by=by)

    def explain(self, key: str, ep: int | None = None, *, ep_shard: int = 1, fsdp: bool = False) -> Explanation:
        """Where ``key`` comes from (HF keys, files, byte ranges, transform, dtype); with ``ep``,
        which bytes each rank reads. Reads no tensor data.

        Example:
            >>> print(vsd.explain("model.layers.3.moe.experts.down_projs", ep=8))  # doctest: +SKIP
        """
        return dryrun.explain(self, key, None if ep is None else dryrun.EPLayout(ep, ep_shard, fsdp))

    def rank_plan(
        self, ep: int, *, ep_shard: int = 1, fsdp: bool = False, keys: Iterable[str] | None = None
    ) -> LoadPlan:
        """Dry-run load plan: bytes each of ``ep * ep_shard`` ranks reads, per layer, imbalance.

        Routed experts are ``Shard(0)`` over ``ep`` (and ``Shard(1)`` over ``ep_shard``);
        other tensors are replicated, or ``Shard(0)`` over all ranks with ``fsdp=True``.
        See :mod:`lazysd.dryrun`. Reads no tensor data.

        Example:
            >>> print(vsd.rank_plan(ep=4))                                   # doctest: +SKIP
        """
        return dryrun.rank_plan(self, dryrun.EPLayout(ep, ep_shard, fsdp), keys=keys)


def _open(
    path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None,
    remote: bool | RemoteOptions,
    revision: str | None,
    *,
    config_required: bool,
    mmap: bool,
) -> Checkpoint:
    """The checkpoint at ``path`` (a directory, file, repo id or URL); ``mmap=True`` needs local files."""
    checkpoint = open_checkpoint(
        path, storage_options=storage_options, remote=remote, revision=revision, config_required=config_required
    )
    if mmap and not checkpoint.local:
        checkpoint.close()
        raise OptionError(
            f"{checkpoint.path}: mmap=True maps local files only; a remote checkpoint is read into memory"
        )
    return checkpoint
