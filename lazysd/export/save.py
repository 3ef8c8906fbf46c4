"""save_hf and save_native: a native state dict streamed into shards, rank by rank, in named phases.

Every rank calls :func:`save_hf` with its own state dict; nothing is gathered. The phases::

    plan files  every rank: HF entries from native metadata -> FileLayout (layout.plan_files)
    agree       rank 0 takes the ExportLock; all_gather(layout digest, problems, token)
    create      rank 0: staging directory with every file, header written, final size  -> barrier
    write       every rank: its own blocks, one bounded slice at a time; fsync -> all_reduce(failed?)
    commit      rank 0: index + config.json into the stage, one atomic switch     -> all_reduce(failed?)
    abort       on any failure anywhere: rank 0 removes the staging directory

The storage-level phases live in :mod:`lazysd.export.layout` and :mod:`lazysd.export.stage`, so
a torch.distributed.checkpoint storage writer drives the same ones and writes the same bytes.

Which rank writes what (:func:`owned`): a DTensor's local shard is written by the ranks at
coordinate 0 of every mesh dim that does not shard it (replicas write once); a plain tensor,
taken to be the same on every rank, by rank ``index % world``. An expert range of a grouped
HF tensor ``[E, out, in]`` is one contiguous byte range, so ``Shard(0)`` experts need one
write per rank; other shardings become a few strided runs.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError, LazySDError
from ..lazy import LazyTensor
from ..progress import ProgressPrinter
from ..reverse import HFPiece, extract
from ..rules import Adapter
from .config import fitted_config
from .layout import FileLayout, plan_files
from .stage import ExportLock, Stage, recover
from .view import NATIVE, HFEntry, HFView, clip, converted, is_dtensor, local_box

__all__ = ["CHUNK_BYTES", "out_dir_problem", "piece_blocks", "save_hf", "save_native"]

# One write moves at most this many bytes of one tensor: memory (and, for a GPU tensor, the
# copy to the CPU) stays bounded whatever a tensor's size; LazyTensor sources read only these.
CHUNK_BYTES = 64 * 2**20

ConfigArg = Mapping[str, Any] | str | os.PathLike[str] | None


@dataclass(frozen=True)
class Ranks:
    """This process's place in an export: which process group, who it is, how many."""

    group: Any  # torch.distributed group, None when single-process
    rank: int
    world: int

    @classmethod
    def of(cls, distributed: bool | None) -> Ranks:
        import torch.distributed as dist

        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return cls(dist.group.WORLD, dist.get_rank(), dist.get_world_size()) if distributed else cls(None, 0, 1)

    def barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def any_failed(self, failed: bool) -> bool:
        if self.group is None:
            return failed
        import torch.distributed as dist

        flag = torch.tensor([int(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def gather(self, obj: Any) -> list[Any]:
        if self.group is None:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


# ---- ownership and bounded blocks ----------------------------------------------------------


def owned(
    ranks: Ranks, native: Any, entry: HFEntry, index: int
) -> tuple[HFPiece, tuple[int, ...], tuple[int, ...]] | None:
    """The part of ``entry`` this rank writes: ``(piece, its HF offset, native origin)``, or None.

    The piece may be empty (a 0 in its shape) when the local shard misses it.
    """
    if not is_dtensor(native):
        if index % ranks.world != ranks.rank:
            return None
        return entry.piece, (0,) * len(entry.piece.shape), (0,) * len(entry.piece.start)
    coord = native.device_mesh.get_coordinate()
    if coord is None:
        return None
    for c, p in zip(coord, native.placements):
        if p.is_partial():
            raise ExportError(f"native key {entry.native_key!r}: Partial placement {p}; reduce it before export")
        if p.is_shard() and type(p).__name__ != "Shard":
            raise ExportError(
                f"native key {entry.native_key!r}: placement {p} is not a plain Shard; redistribute it before export"
            )
        if not p.is_shard() and c != 0:
            return None
    box, origin = local_box(native)
    piece, hf_offset = clip(entry.piece, box)
    return piece, hf_offset, origin


def chunk_boxes(shape: tuple[int, ...], itemsize: int, limit: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(offset, sizes)`` of row-major boxes tiling ``shape``, each of at most ``limit`` bytes.

    Whole trailing dims are kept together: the boxes split the outermost dim whose inner part
    fits (a single element always fits), and step through the dims before it one by one.

    Example:
        >>> list(chunk_boxes((4, 3), 4, limit=24))
        [((0, 0), (2, 3)), ((2, 0), (2, 3))]
        >>> list(chunk_boxes((2, 5), 1, limit=3))
        [((0, 0), (1, 3)), ((0, 3), (1, 2)), ((1, 0), (1, 3)), ((1, 3), (1, 2))]
    """
    if not shape:
        yield (), ()
        return
    if 0 in shape:
        return
    k = 0
    while k < len(shape) - 1 and itemsize * math.prod(shape[k + 1 :]) > limit:
        k += 1
    rows = max(1, limit // (itemsize * math.prod(shape[k + 1 :])))
    for outer in _indices(shape[:k]):
        for r in range(0, shape[k], rows):
            n = min(rows, shape[k] - r)
            yield (*outer, r, *(0,) * (len(shape) - k - 1)), (*(1,) * k, n, *shape[k + 1 :])


def _indices(shape: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _indices(shape[1:]):
            yield (i, *rest)


def blocks(ranks: Ranks, native: Any, entry: HFEntry, index: int) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
    """The ``(HF offset, contiguous HF block)`` pieces of ``entry`` this rank writes (:func:`owned`)."""
    mine = owned(ranks, native, entry, index)
    if mine is None:
        return
    piece, hf_offset, origin = mine
    yield from piece_blocks(native.to_local() if is_dtensor(native) else native, entry, piece, hf_offset, origin)


def piece_blocks(
    tensor: torch.Tensor, entry: HFEntry, piece: HFPiece, hf_offset: tuple[int, ...], origin: tuple[int, ...]
) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
    """``(HF offset, contiguous HF block)`` of ``piece``, a part of ``entry`` inside ``tensor``.

    ``tensor`` is the native tensor or a local shard of it whose first element sits at native
    coordinates ``origin``; ``piece`` and ``hf_offset`` come from :func:`~lazysd.export.view.clip`.
    Each block holds at most :data:`CHUNK_BYTES` and stays on the tensor's device
    (:meth:`~lazysd.export.stage.Stage.write` copies it to the CPU): only one bounded slice at
    a time is converted or copied, whatever the tensor's size or device.
    """
    for offset, sizes in chunk_boxes(piece.shape, entry.dtype.itemsize, CHUNK_BYTES):
        start = list(piece.start)
        for i, d in enumerate(piece.dims):
            if d is not None:
                start[i] += offset[d]
        chunk = replace(piece, shape=sizes, start=tuple(start))
        at = tuple(h + o for h, o in zip(hf_offset, offset))
        yield at, converted(extract(tensor, chunk, origin=origin), entry.dtype)


def _share(ranks: Ranks, entries: list[HFEntry], natives: dict[str, Any]) -> int:
    """Bytes this rank will write (for its progress line), by the rules of :func:`owned`."""
    total = 0
    for i, e in enumerate(entries):
        mine = owned(ranks, natives[e.native_key], e, i)
        if mine is not None:
            total += e.dtype.itemsize * math.prod(mine[0].shape)
    return total


# ---- checks ----------------------------------------------------------------------------------


def source_files(state_dict: Any) -> list[Path]:
    """Checkpoint directories and files the state dict reads from (lazy values only)."""
    out: list[Path] = []
    ckpt = getattr(state_dict, "checkpoint", None)
    if ckpt is not None:
        # A remote checkpoint's files are not on this machine: no output can be one of them.
        return [Path(ckpt.path), *ckpt.files] if getattr(ckpt, "local", True) else []
    if isinstance(state_dict, Mapping):
        files: dict[Path, None] = {}
        for v in state_dict.values():
            if isinstance(v, LazyTensor):
                files.update(
                    dict.fromkeys(
                        Path(src.info.file) for src in v.entry.sources if isinstance(src.info.file, (str, os.PathLike))
                    )
                )
        out = [p for f in files for p in (f, f.parent)]
    return out


def out_dir_problem(out_dir: Path, sources: list[Path], overwrite: bool) -> str | None:
    """Why ``out_dir`` must not be written, or None."""
    target = out_dir.resolve()
    for src in sources:
        src = src.resolve()
        if src == target or (src.is_file() and src.parent == target):
            return f"{out_dir}: is the source checkpoint's directory ({src}); export to a new directory"
    if out_dir.exists() and not out_dir.is_dir():
        return f"{out_dir}: exists and is not a directory"
    if os.path.ismount(target):
        # The export is staged beside out_dir and renamed onto it: a mount point cannot be.
        return f"{out_dir}: is a mount point; export into a directory inside it (e.g. {out_dir / 'model'})"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        return f"{out_dir}: exists and is not empty; pass overwrite=True (--overwrite) to replace its weights"
    return None


def _check_values(natives: dict[str, Any], distributed: bool) -> None:
    """Tensors that cannot be written, refused before any file exists."""
    for key, t in natives.items():
        local = t.to_local() if is_dtensor(t) else t
        if getattr(local, "device", None) is not None and local.device.type == "meta":
            raise ExportError(
                f"native key {key[:200]!r} is on the meta device: it has a shape but no data; "
                "load or initialize the weights (e.g. model.to_empty(device=...) then load) before export"
            )
        if (
            not distributed
            and is_dtensor(t)
            and t.device_mesh.size() > 1
            and any(p.is_shard() or p.is_partial() for p in t.placements)
        ):
            raise ExportError(
                f"native key {key[:200]!r} is a sharded DTensor: call save_hf on every rank (distributed export)"
            )


# ---- the phases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What one export writes, planned from metadata (phase "plan files")."""

    entries: list[HFEntry]
    natives: dict[str, Any]  # native key -> value, each fetched once
    layout: FileLayout
    config: bytes | None  # config.json to write
    digest: str  # equal on ranks that agree on keys, shapes, dtypes and which values are DTensors


def _plan(
    view: HFView, max_shard_size: int | str, config: ConfigArg, dtype: torch.dtype | None, distributed: bool
) -> _Job:
    entries = list(view.entries.values())
    if not entries:
        raise ExportError("nothing to export, the state dict is empty")
    natives = {key: view.native[key] for key in dict.fromkeys(e.native_key for e in entries)}
    _check_values(natives, distributed)
    layout = plan_files([(e.key, e.dtype, e.shape) for e in entries], max_shard_size)
    config_bytes = (
        None
        if config is None
        else fitted_config(config, entries, adapter=view.adapter, num_layers=view.num_layers, dtype=dtype)
    )
    flags = [(e.key, e.native_key, is_dtensor(natives[e.native_key])) for e in entries]
    digest = hashlib.sha256((layout.digest + repr(flags)).encode()).hexdigest()
    return _Job(entries, natives, layout, config_bytes, digest)


def _write(ranks: Ranks, job: _Job, stage: Stage, progress: bool) -> None:
    """Phase "write": this rank's blocks into the staged files, then fsync them."""
    report: ProgressPrinter | None = None
    if progress and ranks.rank == 0:
        # Rank 0 reports; in a distributed export it counts only the bytes it writes itself.
        report = ProgressPrinter(
            job.layout.total_size if ranks.group is None else _share(ranks, job.entries, job.natives), verb="wrote "
        )
    for i, e in enumerate(job.entries):
        wrote = 0
        for offset, block in blocks(ranks, job.natives[e.native_key], e, i):
            n = stage.write(e.key, offset, block)
            wrote += n
            if report is not None:
                report.add(n)
        if wrote and report is not None:
            report.add(0, 1)
    stage.flush()
    if report is not None:
        report.finish()


def _export(
    view: HFView,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str,
    config: ConfigArg,
    dtype: torch.dtype | None,
    overwrite: bool,
    progress: bool,
    distributed: bool | None,
) -> Path:
    shown = Path(out_dir).expanduser().absolute()
    real = Path(os.path.realpath(shown))  # stage next to the real directory: one filesystem, atomic renames
    ranks = Ranks.of(distributed)
    lock = ExportLock(real)
    problem: str | None = None
    job: _Job | None = None
    try:
        try:
            if ranks.rank == 0:
                lock.__enter__()
                recover(real)
            job = _plan(view, max_shard_size, config, dtype, ranks.group is not None)
            problem = out_dir_problem(shown, source_files(view.native), overwrite)
        except LazySDError as e:
            problem = str(e)
        except OSError as e:  # the lock's or an earlier export's leftovers: report it on every rank
            problem = f"{shown}: {e}"
        return _run(ranks, job, problem, real, shown, overwrite, progress)
    finally:
        lock.__exit__(None, None, None)


def _run(
    ranks: Ranks, job: _Job | None, problem: str | None, real: Path, shown: Path, overwrite: bool, progress: bool
) -> Path:
    """Phases agree, create, write and commit (or abort)."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    answers = ranks.gather((job.digest if job else None, problem, token))
    if problem is not None:
        raise ExportError(problem)
    if any(p is not None for _, p, _ in answers):
        raise ExportError(next(p for _, p, _ in answers if p is not None))
    assert job is not None
    if any(d != job.digest for d, _, _ in answers):
        raise ExportError(
            f"{shown}: ranks disagree on the keys, shapes or dtypes to export; every rank must pass the same native "
            "keys"
        )
    stage = Stage(real, job.layout, answers[0][2])
    failed: BaseException | None = None
    for phase in ("create", "write", "commit"):
        try:
            if phase == "create" and ranks.rank == 0:
                stage.create()
            elif phase == "write":
                _write(ranks, job, stage, progress)
            elif phase == "commit" and ranks.rank == 0:
                stage.commit(config=job.config, overwrite=overwrite)
        except BaseException as e:  # noqa: BLE001 - every rank must learn of it before anyone commits
            failed = e
        if ranks.any_failed(failed is not None):
            stage.abort() if ranks.rank == 0 else stage.close()
            if failed is not None:
                raise failed
            raise ExportError(f"{shown}: another rank failed to {phase} its part of the export; nothing was committed")
    return shown


def save_hf(
    state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    adapter: Adapter | str | None = None,
    max_shard_size: int | str = "5GB",
    config: ConfigArg = None,
    num_layers: int | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    distributed: bool | None = None,
) -> Path:
    """Write a native state dict (or model) as a Hugging Face safetensors checkpoint.

    Writes ``model-0000i-of-0000N.safetensors`` (HF keys, file metadata ``{"format": "pt"}``)
    and ``model.safetensors.index.json``, plus ``config.json`` when ``config`` is given. The
    output loads with ``safetensors.torch.load_file`` and with :class:`~lazysd.VirtualStateDict`.

    Streaming: tensors are converted and written one slice (at most 64 MiB) at a time straight
    to their file offsets, so memory beyond the state dict itself stays bounded; lazy values
    (a VirtualStateDict) are read slice by slice too, and tensors on a GPU (any device) are
    copied to the CPU one such slice at a time.

    Safety: the export is built in a hidden sibling directory (``.<name>.lazysd-stage-*``)
    and put in place of ``out_dir`` by one atomic rename when every rank has finished, so
    ``out_dir`` always holds the old export or the new one, never a mix, even if the process
    is killed; an interrupted export leaves only that hidden directory, removed by the next
    export into ``out_dir``. Two exports into one directory at once are refused
    (:class:`~lazysd.errors.ExportError` for the second), through a lock file
    ``.<name>.lazysd-lock`` beside it. Writing into the source checkpoint's directory is
    refused. The parent of ``out_dir`` must be writable, and ``out_dir`` no mount point (export
    into a directory inside it). While an ``overwrite=True`` export runs, old and new weights
    both take disk space.

    config.json: the given config is written as is, except for fields that would contradict
    the tensors written: ``quantization_config`` is dropped when no FP8 tensor is written (a
    dequantized export), ``num_nextn_predict_layers`` is set to the number of MTP layers
    written (0 when the state dict holds none), and ``torch_dtype`` follows ``dtype``.

    Distributed: when ``torch.distributed`` is initialized with several ranks (or
    ``distributed=True``), call this on every rank with that rank's state dict. DTensor values
    are written from local shards only (no gathers); plain tensors must be identical on every
    rank (replicated) and are written by one rank each. Output is byte-identical to a
    single-process export of the full state dict.

    Args:
        state_dict: native key -> tensor (plain, LazyTensor or DTensor), or a module.
        out_dir: output directory; created if missing.
        adapter: model family (Adapter or registered name); a VirtualStateDict's own by default.
        max_shard_size: bytes per file, an int or a string like ``"5GB"`` (10**9) or ``"2GiB"``;
            a tensor larger than this gets a file of its own.
        config: a dict written as config.json, or the path of a config.json to copy.
        num_layers: main decoder layers, to number ``mtp.layers.{i}`` keys back; a
            VirtualStateDict's config, else ``config``'s, by default.
        dtype: cast floating-point tensors (rule-pinned dtypes such as the fp32 router bias,
            and FP8 weights, keep theirs).
        overwrite: allow a non-empty ``out_dir``: its ``*.safetensors`` files and index are
            replaced (and config.json when ``config`` is given), other files are kept.
        progress: print a progress line to stderr (rank 0).
        distributed: force distributed (True) or single-process (False) export; default:
            distributed when the default process group has more than one rank.

    Returns:
        ``out_dir`` as an absolute Path.

    Raises:
        ExportError: out_dir is the source, or not empty without ``overwrite``; another export
            into it is running; a meta tensor; a sharded DTensor in a single-process export;
            ranks disagree on keys; a write fails (a full disk: the message names the file).
        UnclaimedKeyError: a native key no rule of the adapter produces.

    Example:
        >>> import tempfile
        >>> from lazysd import VirtualStateDict
        >>> from lazysd.testing import Step3p5Spec, make_checkpoint
        >>> src = make_checkpoint(tempfile.mkdtemp(), Step3p5Spec.tiny())
        >>> with VirtualStateDict(src, include_mtp=True) as vsd:
        ...     out = save_hf(vsd, tempfile.mkdtemp() + "/copy", max_shard_size="100KB", config=src / "config.json")
        >>> len(list(out.glob("model-*.safetensors")))
        2
    """
    view = (
        state_dict
        if isinstance(state_dict, HFView)
        else HFView(state_dict, adapter=adapter, num_layers=num_layers, dtype=dtype)
    )
    return _export(
        view,
        out_dir,
        max_shard_size=max_shard_size,
        config=config,
        dtype=dtype,
        overwrite=overwrite,
        progress=progress,
        distributed=distributed,
    )


def save_native(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    config: ConfigArg = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a state dict under its own (native) keys, sharded and committed like :func:`save_hf`.

    lazysd has no native checkpoint format beyond this: safetensors files of native keys plus
    an index, the input of ``lazysd convert --from native``, read back as
    ``VirtualStateDict(path, adapter=lazysd.export.NATIVE)``.

    Example:
        >>> import tempfile, torch
        >>> out = save_native({"w": torch.ones(2)}, tempfile.mkdtemp() + "/n")
        >>> sorted(p.name for p in out.iterdir())
        ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
    """
    return _export(
        HFView(state_dict, adapter=NATIVE),
        out_dir,
        max_shard_size=max_shard_size,
        config=config,
        dtype=None,
        overwrite=overwrite,
        progress=progress,
        distributed=False,
    )
