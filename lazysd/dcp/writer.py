"""DCP ``StorageWriter`` that writes a native state dict as a Hugging Face checkpoint: :class:`HFWriter`.

The coordinator fixes the file layout once (``prepare_global_plan``); every rank writes the
shards it is given into a staging directory that ``finish`` commits. See :mod:`lazysd.dcp`.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..adapters import resolve_adapter
from ..errors import ExportError
from ..export import (
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
from ..export.config import config_layers
from ..geometry import Box
from ..rules import Adapter
from .reader import new_id


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
        self.save_id = new_id()

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
                raise ExportError(
                    f"{self.path}: {item.index.fqn!r} is not a tensor; an HF checkpoint holds tensors only"
                )
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
                    raise ExportError(
                        f"{self.path}: ranks disagree on {item.index.fqn!r}: {meta[item.index.fqn]} vs {found}"
                    )
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
            config = fitted_config(
                self.config, entries, adapter=self.adapter, num_layers=self.num_layers, dtype=self.dtype
            )
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
                    f"{'written twice' if written > total else 'not written'} (is every rank part of every DTensor "
                    "mesh?)"
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
        view = HFView(
            shapes,
            adapter=self.adapter,
            num_layers=self.num_layers if self.num_layers is not None else self._config_layers(),
            dtype=self.dtype,
        )
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

    if (
        world <= 1
        or not dist.is_initialized()
        or dist.get_world_size() != world
        or threading.current_thread() is not threading.main_thread()
    ):
        return failed
    flags: list[Any] = [None] * world
    dist.all_gather_object(flags, failed)  # an object collective: works over NCCL and gloo alike
    return any(flags)
