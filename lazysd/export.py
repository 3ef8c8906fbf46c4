"""Export: native state dicts back to Hugging Face safetensors, lazily and rank by rank.

:class:`HFView` shows HF keys over a native state dict (plain tensors, lazysd's lazy values or
DTensors) by running the adapter's rules backwards (:mod:`lazysd.reverse`): keys and shapes
come from native keys and shapes only; each value is cut out and converted when accessed.
:func:`save_hf` streams such a view into ``model-0000i-of-0000N.safetensors`` shards plus
``model.safetensors.index.json``, a slice of one tensor at a time.

Distributed export (every rank calls :func:`save_hf` with its own state dict) never gathers:
the file layout is planned from metadata on every rank, rank 0 creates the files with their
headers, and each rank ``pwrite`` s the bytes it holds. An expert range of a grouped HF tensor
``[E, out, in]`` is one contiguous byte range, so ``Shard(0)`` experts need one write per rank;
other shardings (``Shard(1)`` from FSDP, per-expert keys) become a few strided runs. The order
of operations::

    every rank: plan files from metadata -> check output dir -> all_gather(plan digest, checks)
    rank 0:     create temporary files (header, final size)           -> barrier
    every rank: pwrite its own bytes, fsync                           -> all_reduce(failed?)
    rank 0:     rename shards into place, write config.json, then the index last -> barrier

Shape legend: E experts, D hidden, I expert intermediate.

Example:
    >>> import tempfile, torch
    >>> from lazysd.testing import Step3p5Model, Step3p5Spec
    >>> model = Step3p5Model(Step3p5Spec.tiny(), layout="native")
    >>> view = HFView(model.state_dict(), adapter="step3p5")
    >>> view["model.layers.1.moe.gate_proj.weight"].shape      # [E, I, D], cut out of gate_and_up_projs
    torch.Size([8, 16, 32])
    >>> out = save_hf(model, tempfile.mkdtemp() + "/export", adapter="step3p5")
    >>> sorted(p.name for p in out.iterdir())
    ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .adapters import resolve_adapter
from .checkpoint import INDEX_NAME, Checkpoint, TensorInfo
from .distributed import Target, contiguous_stride, local_box_of
from .errors import ExportError, MissingKeyError
from .geometry import byte_runs
from .lazy import LazyTensor, is_dtensor
from .progress import ProgressPrinter
from .reverse import HFPiece, extract, hf_pieces
from .rules import Adapter, Rule
from .transpose import contiguous
from .writer import header_bytes, pwrite_all

__all__ = ["HFView", "HFEntry", "save_hf", "save_native", "parse_size"]

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
# One write moves at most this many bytes of one tensor: memory stays bounded whatever a
# tensor's size, and LazyTensor sources read only these rows.
CHUNK_BYTES = 64 * 2**20
_TMP_MARK = ".tmp-"
_IDENTITY = Rule("native")  # rule carried by identity pieces (native output)


@dataclass(frozen=True)
class HFEntry:
    """One output tensor: where it lives in the native state dict, and what is written."""

    key: str  # output (HF) key
    native_key: str  # native key holding it
    piece: HFPiece  # its block of the native tensor and the dim mapping
    dtype: torch.dtype  # dtype written (rule-pinned dtypes like the fp32 router bias win)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.piece.shape

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def _out_dtype(t: torch.Tensor, rule: Rule, dtype: torch.dtype | None) -> torch.dtype:
    if rule.dtype is not None:
        return rule.dtype
    if dtype is not None and t.is_floating_point():
        return dtype
    return t.dtype


class HFView(Mapping[str, torch.Tensor]):
    """HF keys over a native state dict; each value is converted only when accessed.

    Keys, ``len`` and shapes (:attr:`entries`) come from native keys and shapes, never from
    tensor data. ``view[key]`` cuts the HF tensor out of its native tensor (gate or up half of
    ``gate_and_up_projs``, transposed back; ``e_score_correction_bias`` as ``router_bias``; one
    expert of a stacked family) and returns it contiguous. Lazy values (a
    :class:`~lazysd.VirtualStateDict`'s) read only that piece's bytes.

    DTensor values: when the native placements carry over to the HF tensor, the value is a
    DTensor over the same mesh, built from this rank's local shard without communication:
    ``Shard(0)`` on experts stays ``Shard(0)`` of HF ``[E, I, D]``; ``Shard(1)`` of native
    ``gate_and_up_projs`` ``[E, D, 2I]`` becomes ``Shard(2)``; ``Shard(2)`` of ``down_projs``
    ``[E, I, D]`` becomes ``Shard(1)``. When they do not (a shard of the gate/up concat dim, one
    expert of a per-expert family whose experts are sharded, ``Partial``), the value is the full
    HF tensor from ``full_tensor()``: a collective, so every rank must access such keys in the
    same order. :func:`save_hf` never does this: it writes each rank's local bytes.

    Args:
        state_dict: native key -> tensor (plain, LazyTensor or DTensor), e.g. a model's
            ``state_dict()`` or a VirtualStateDict; a ``torch.nn.Module`` is taken as its
            ``state_dict()``.
        adapter: model family (an Adapter or a registered name); defaults to a
            VirtualStateDict's own adapter.
        num_layers: main decoder layers, to number ``mtp.layers.{i}`` keys back to
            ``model.layers.{num_layers + i}``; defaults to a VirtualStateDict's config.
        dtype: cast floating-point tensors to this dtype (rule-pinned dtypes, like the fp32
            router bias, keep theirs).

    Raises:
        UnclaimedKeyError: a native key no rule of the adapter produces.
        ExportError: two native keys give the same HF key, or MTP keys without ``num_layers``.

    Example:
        >>> from lazysd.testing import Step3p5Model, Step3p5Spec
        >>> sd = Step3p5Model(Step3p5Spec.tiny(), layout="native").state_dict()
        >>> view = HFView(sd, adapter="step3p5")
        >>> view["model.layers.1.moe.router_bias"].dtype
        torch.float32
        >>> len(view) - len(sd)   # 3 MoE layers: gate_and_up_projs splits into gate and up
        3
    """

    def __init__(
        self,
        state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
        *,
        adapter: Adapter | str | None = None,
        num_layers: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(state_dict, torch.nn.Module):
            state_dict = state_dict.state_dict()
        self.native = state_dict
        plan = getattr(state_dict, "plan", None)  # a VirtualStateDict knows its family and layers
        if adapter is None:
            adapter = getattr(state_dict, "adapter", None)
            if adapter is None:
                raise ExportError("HFView/save_hf: pass adapter= (e.g. adapter='step3p5') to say how native keys map to HF keys")
        self.adapter = resolve_adapter(adapter, {})
        if num_layers is None and plan is not None:
            num_layers = plan.num_layers
        self.num_layers = num_layers
        self.entries: dict[str, HFEntry] = {}
        for native_key in state_dict:
            t = state_dict[native_key]
            if num_layers is None and self.adapter.mtp_index(native_key) is not None:
                raise ExportError(
                    f"native key {native_key!r} is an MTP layer; pass num_layers= (the config's "
                    f"{self.adapter.num_layers[0]}) so it can be numbered back to model.layers.*"
                )
            for piece in hf_pieces(self.adapter, native_key, tuple(t.shape), num_layers=num_layers):
                if piece.key in self.entries:
                    raise ExportError(
                        f"HF key {piece.key!r} comes from both native key {self.entries[piece.key].native_key!r} and {native_key!r}"
                    )
                self.entries[piece.key] = HFEntry(piece.key, native_key, piece, _out_dtype(t, piece.rule, dtype))

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.entries.get(key)
        if entry is None:
            raise MissingKeyError(f"no HF key {key!r} in this view ({len(self)} keys from {len(self.native)} native keys)")
        native = self.native[entry.native_key]
        if is_dtensor(native):
            return _dtensor_value(native, entry)
        return _converted(extract(native, entry.piece), entry.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    @property
    def nbytes(self) -> int:
        """Bytes of all HF tensors, as written."""
        return sum(e.nbytes for e in self.entries.values())

    def __repr__(self) -> str:
        return f"HFView({self.adapter.name}, {len(self)} HF keys over {len(self.native)} native keys, {self.nbytes / 2**30:.2f} GiB)"


def _converted(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    block = contiguous(block)
    return block if block.dtype == dtype else block.to(dtype)


def _clip(piece: HFPiece, box: tuple[tuple[int, int], ...]) -> tuple[HFPiece, tuple[int, ...]]:
    """The part of ``piece`` inside native ``box``, and where that part starts in the HF tensor.

    The result may be empty (a 0 in its shape) when the box misses the piece.
    """
    start = list(piece.start)
    shape = list(piece.shape)
    offset = [0] * len(piece.shape)
    missed = False
    for i, ((lo, hi), (p_lo, p_hi)) in enumerate(zip(box, piece.box)):
        a, b = max(lo, p_lo), min(hi, p_hi)
        start[i] = a
        d = piece.dims[i]
        if d is None:  # stacking dim: extent 1, in or out
            missed = missed or b <= a
            continue
        shape[d] = max(0, b - a)
        offset[d] = a - p_lo
    if missed:
        shape = [0] * len(shape)
    return replace(piece, shape=tuple(shape), start=tuple(start)), tuple(offset)


def _local_box(t: Any) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """A DTensor's local shard as a native box, and its origin."""
    box = local_box_of(tuple(t.shape), Target(t.device_mesh, tuple(t.placements)))
    return box, tuple(lo for lo, _ in box)


def _map_placements(piece: HFPiece, native_shape: tuple[int, ...], placements: Any) -> list[Any] | None:
    """Native placements as placements of the HF piece, or None where they do not carry over."""
    from torch.distributed.tensor import Replicate, Shard

    out: list[Any] = []
    for p in placements:
        if isinstance(p, Replicate):
            out.append(Replicate())
        elif type(p) is Shard:
            d = piece.dims[p.dim]
            # A shard of only part of a dim (the gate/up concat dim) or of the stacking dim
            # is no even shard of the HF tensor.
            if d is None or piece.extent[p.dim] != native_shape[p.dim]:
                return None
            out.append(Shard(d))
        else:
            return None
    return out


def _dtensor_value(native: Any, entry: HFEntry) -> Any:
    from torch.distributed.tensor import DTensor

    placements = _map_placements(entry.piece, tuple(native.shape), native.placements)
    if placements is None:
        return _converted(extract(native.full_tensor(), entry.piece), entry.dtype)
    box, origin = _local_box(native)
    sub, _ = _clip(entry.piece, box)
    local = _converted(extract(native.to_local(), sub, origin=origin), entry.dtype)
    return DTensor.from_local(
        local, native.device_mesh, placements, run_check=False, shape=torch.Size(entry.shape), stride=contiguous_stride(entry.shape)
    )


# ---- sizes and file planning ---------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"5GB"`` (10**9) or ``"512MiB"`` (2**20).

    Example:
        >>> parse_size("5GB"), parse_size("1.5 GiB"), parse_size(1024)
        (5000000000, 1610612736, 1024)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ExportError(f"max_shard_size {size!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ExportError(f"max_shard_size must be positive, got {size!r}")
    return value


def _plan_files(entries: list[HFEntry], max_bytes: int) -> list[tuple[str, list[HFEntry]]]:
    """Pack entries in order into files of at most ``max_bytes`` (a bigger tensor sits alone)."""
    groups: list[list[HFEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return [(SHARD_NAME.format(index=i + 1, count=len(groups)), g) for i, g in enumerate(groups)]


# ---- writing -------------------------------------------------------------------------------


def _write_block(fd: int, base: int, hf_shape: tuple[int, ...], offset: tuple[int, ...], block: torch.Tensor) -> None:
    """Write contiguous ``block`` (a box of an HF tensor at ``offset``) as row-major runs.

    ``base`` is the file position of the HF tensor's first byte. A box spanning whole trailing
    dims is one run (``Shard(0)`` experts); otherwise adjacent rows merge into as few runs as
    the box allows (:func:`lazysd.geometry.byte_runs`).
    """
    data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
    box = [(o, o + n) for o, n in zip(offset, block.shape)]
    done = 0
    for pos, n in byte_runs(hf_shape, block.element_size(), box):
        pwrite_all(fd, data[done : done + n], base + pos)
        done += n


@dataclass(frozen=True)
class _Writer:
    """This rank's place in an export: which process group, who it is, what it writes."""

    group: Any  # torch.distributed group, None when single-process
    rank: int
    world: int

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


def _owned(writer: _Writer, native: Any, entry: HFEntry, index: int) -> tuple[HFPiece, tuple[int, ...], tuple[int, ...]] | None:
    """The part of ``entry`` this rank writes: ``(piece, its HF offset, native origin)``, or None.

    Plain tensors are taken to be the same on every rank (replicated) and are written by rank
    ``index % world``. A DTensor's local shard is written by the ranks at coordinate 0 of every
    mesh dim that does not shard it, so replicas write once; ranks outside its mesh write none.
    The piece may be empty (a 0 in its shape) when the local shard misses it.
    """
    if not is_dtensor(native):
        if index % writer.world != writer.rank:
            return None
        return entry.piece, (0,) * len(entry.piece.shape), (0,) * len(entry.piece.start)
    coord = native.device_mesh.get_coordinate()
    if coord is None:
        return None
    for c, p in zip(coord, native.placements):
        if p.is_partial():
            raise ExportError(f"native key {entry.native_key!r}: Partial placement {p}; reduce it before export")
        if p.is_shard() and type(p).__name__ != "Shard":
            raise ExportError(f"native key {entry.native_key!r}: placement {p} is not a plain Shard; redistribute it before export")
        if not p.is_shard() and c != 0:
            return None
    box, origin = _local_box(native)
    piece, hf_offset = _clip(entry.piece, box)
    return piece, hf_offset, origin


def _blocks(writer: _Writer, native: Any, entry: HFEntry, index: int) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
    """The (HF offset, contiguous HF block) pieces of ``entry`` this rank writes (:func:`_owned`),
    in chunks of at most ``CHUNK_BYTES``."""
    owned = _owned(writer, native, entry, index)
    if owned is None:
        return
    piece, hf_offset, origin = owned
    tensor = native.to_local() if is_dtensor(native) else native
    if 0 in piece.shape:
        return
    if not piece.shape:  # 0-dim
        yield hf_offset, _converted(extract(tensor, piece, origin=origin), entry.dtype)
        return
    # Chunk along HF dim 0, i.e. native dim n0: each chunk is a box of the HF tensor.
    n0 = piece.dims.index(0)
    row = entry.dtype.itemsize * math.prod(piece.shape[1:])
    rows = max(1, CHUNK_BYTES // max(row, 1))
    for r in range(0, piece.shape[0], rows):
        n = min(rows, piece.shape[0] - r)
        start = list(piece.start)
        start[n0] += r
        chunk = replace(piece, shape=(n, *piece.shape[1:]), start=tuple(start))
        yield (hf_offset[0] + r, *hf_offset[1:]), _converted(extract(tensor, chunk, origin=origin), entry.dtype)


def _source_files(state_dict: Any) -> list[Path]:
    """Checkpoint directories and files the state dict reads from (lazy values only)."""
    out: list[Path] = []
    ckpt = getattr(state_dict, "checkpoint", None)
    if ckpt is not None:
        out += [Path(ckpt.path), *ckpt.files]
    out += [Path(f) for f in getattr(state_dict, "source_files", ())]
    if ckpt is None and isinstance(state_dict, Mapping):
        seen: set[int] = set()
        for v in state_dict.values():
            if isinstance(v, LazyTensor) and id(v._reader.ckpt) not in seen:
                seen.add(id(v._reader.ckpt))
                out += [Path(v._reader.ckpt.path), *v._reader.ckpt.files]
    return out


def _check_out_dir(out_dir: Path, sources: list[Path], overwrite: bool) -> str | None:
    """Why ``out_dir`` must not be written, or None."""
    target = out_dir.resolve()
    for src in sources:
        src = src.resolve()
        if src == target or (src.is_file() and src.parent == target):
            return f"{out_dir}: is the source checkpoint's directory ({src}); export to a new directory"
    if out_dir.exists() and not out_dir.is_dir():
        return f"{out_dir}: exists and is not a directory"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        return f"{out_dir}: exists and is not empty; pass overwrite=True (--overwrite) to replace its weights"
    return None


def _commit(out_dir: Path, files: list[tuple[str, Path]], index: dict[str, Any], config: Mapping[str, Any] | str | os.PathLike[str] | None, token: str) -> None:
    """Rename complete shards into place, replace config.json, write the index last."""
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # old weights stop looking complete first
    new_names = {name for name, _ in files}
    for name, tmp in files:
        os.replace(tmp, out_dir / name)
    for old in out_dir.iterdir():
        # Overwrite replaces the weights: stale shards of an earlier export and temporaries
        # of killed ones go; other files (tokenizer, README) stay.
        if (old.suffix == ".safetensors" and old.name not in new_names) or (old.name.startswith(".") and _TMP_MARK in old.name):
            old.unlink(missing_ok=True)
    if config is not None:
        tmp = out_dir / f".config.json{_TMP_MARK}{token}"
        if isinstance(config, Mapping):
            tmp.write_text(json.dumps(dict(config), indent=2) + "\n")
        else:
            shutil.copyfile(config, tmp)
        os.replace(tmp, out_dir / "config.json")
    tmp = out_dir / f".{INDEX_NAME}{_TMP_MARK}{token}"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / INDEX_NAME)


def _export(
    view: HFView,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str,
    config: Mapping[str, Any] | str | os.PathLike[str] | None,
    overwrite: bool,
    progress: bool,
    distributed: bool | None,
) -> Path:
    out_dir = Path(out_dir).absolute()
    max_bytes = parse_size(max_shard_size)
    if not view.entries:
        raise ExportError(f"{out_dir}: nothing to export, the state dict is empty")
    if config is not None and not isinstance(config, Mapping) and not Path(config).is_file():
        raise ExportError(f"config {config}: not a file; pass a dict or the path of a config.json")

    import torch.distributed as dist

    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    writer = _Writer(dist.group.WORLD, dist.get_rank(), dist.get_world_size()) if distributed else _Writer(None, 0, 1)
    entries = list(view.entries.values())
    natives = {key: view.native[key] for key in dict.fromkeys(e.native_key for e in entries)}  # each fetched once
    if not distributed:
        for key, t in natives.items():
            if is_dtensor(t) and any(p.is_shard() or p.is_partial() for p in t.placements) and t.device_mesh.size() > 1:
                raise ExportError(f"native key {key!r} is a sharded DTensor: call save_hf on every rank (distributed export)")

    files = _plan_files(entries, max_bytes)
    total = sum(e.nbytes for e in entries)
    # Every rank must agree on the layout, else their bytes would land in the wrong places.
    digest = hashlib.sha256(
        repr([(name, [(e.key, e.native_key, str(e.dtype), e.shape, is_dtensor(natives[e.native_key])) for e in group]) for name, group in files]).encode()
    ).hexdigest()
    problem = _check_out_dir(out_dir, _source_files(view.native), overwrite)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    answers = writer.gather((digest, problem, token))
    if problem is not None:
        raise ExportError(problem)
    if any(p is not None for _, p, _ in answers):
        raise ExportError(next(p for _, p, _ in answers if p is not None))
    if any(d != digest for d, _, _ in answers):
        raise ExportError(f"{out_dir}: ranks disagree on the keys, shapes or dtypes to export; every rank must pass the same native keys")
    token = answers[0][2]

    tmp_files = [(name, out_dir / f".{name}{_TMP_MARK}{token}") for name, _ in files]
    heads: list[tuple[bytes, dict[str, tuple[int, int]]]] = []  # per file: header, key -> data offsets
    failed: BaseException | None = None
    if writer.rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            heads = _headers(files)
            for (head, _), (_, group), (_, tmp) in zip(heads, files, tmp_files):
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    pwrite_all(fd, memoryview(head), 0)
                    os.ftruncate(fd, len(head) + sum(e.nbytes for e in group))
                finally:
                    os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported to every rank below
            failed = e
    if writer.any_failed(failed is not None):
        _cleanup(writer, tmp_files)
        raise failed if failed is not None else ExportError(f"{out_dir}: rank 0 could not create the output files")

    if writer.rank != 0:  # rank 0 built them above; here they cannot fail, as they did not there
        heads = _headers(files)
    index_of = {e.key: i for i, e in enumerate(entries)}
    report: ProgressPrinter | None = None
    try:
        if progress and writer.rank == 0:
            # Rank 0 reports; in a distributed export it counts only the bytes it writes itself.
            report = ProgressPrinter(total if not distributed else _share(writer, entries, natives), verb="wrote ")
        for ((_, group), (_, tmp), (head, offsets)) in zip(files, tmp_files, heads):
            fd = os.open(tmp, os.O_RDWR)
            try:
                for e in group:
                    base = len(head) + offsets[e.key][0]
                    wrote = 0
                    for hf_offset, block in _blocks(writer, natives[e.native_key], e, index_of[e.key]):
                        _write_block(fd, base, e.shape, hf_offset, block)
                        wrote += block.numel() * block.element_size()
                        if report is not None:
                            report.add(block.numel() * block.element_size())
                    if wrote and report is not None:
                        report.add(0, 1)
                os.fsync(fd)
            finally:
                os.close(fd)
        if report is not None:
            report.finish()
    except BaseException as e:  # noqa: BLE001 - every rank must learn of it before anyone commits
        failed = e
    if writer.any_failed(failed is not None):
        _cleanup(writer, tmp_files)
        if failed is not None:
            raise failed
        raise ExportError(f"{out_dir}: another rank failed while writing; nothing was committed")

    if writer.rank == 0:
        weight_map = {e.key: name for name, group in files for e in group}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        try:
            _commit(out_dir, tmp_files, index, config, token)
        except BaseException as e:  # noqa: BLE001
            failed = e
    if writer.any_failed(failed is not None):
        _cleanup(writer, tmp_files)
        raise failed if failed is not None else ExportError(f"{out_dir}: rank 0 failed to commit the export")
    return out_dir


def _headers(files: list[tuple[str, list[HFEntry]]]) -> list[tuple[bytes, dict[str, tuple[int, int]]]]:
    """Each file's safetensors header and its keys' data offsets."""
    return [header_bytes([(e.key, e.dtype, e.shape) for e in group], {"format": "pt"}) for _, group in files]


def _share(writer: _Writer, entries: list[HFEntry], natives: dict[str, Any]) -> int:
    """Bytes this rank will write (for its progress line), by the rules of :func:`_owned`."""
    total = 0
    for i, e in enumerate(entries):
        owned = _owned(writer, natives[e.native_key], e, i)
        if owned is not None:
            total += e.dtype.itemsize * math.prod(owned[0].shape)
    return total


def _cleanup(writer: _Writer, tmp_files: list[tuple[str, Path]]) -> None:
    if writer.rank == 0:
        for _, tmp in tmp_files:
            tmp.unlink(missing_ok=True)


def save_hf(
    state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    adapter: Adapter | str | None = None,
    max_shard_size: int | str = "5GB",
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
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
    (a VirtualStateDict) are read slice by slice too.

    Safety: shards are written under hidden temporary names and renamed into place only when
    every rank has finished; the index is written last, so an interrupted export never leaves
    a complete-looking checkpoint. Writing into the source checkpoint's directory is refused.

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
            VirtualStateDict's config by default.
        dtype: cast floating-point tensors (rule-pinned dtypes such as the fp32 router bias keep theirs).
        overwrite: allow a non-empty ``out_dir``: its ``*.safetensors`` files and index are
            replaced, other files are kept.
        progress: print a progress line to stderr (rank 0).
        distributed: force distributed (True) or single-process (False) export; default:
            distributed when the default process group has more than one rank.

    Returns:
        ``out_dir`` as an absolute Path.

    Raises:
        ExportError: out_dir is the source, or not empty without ``overwrite``; a sharded
            DTensor in a single-process export; ranks disagree on keys.
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
    view = state_dict if isinstance(state_dict, HFView) else HFView(state_dict, adapter=adapter, num_layers=num_layers, dtype=dtype)
    return _export(
        view,
        out_dir,
        max_shard_size=max_shard_size,
        config=config,
        overwrite=overwrite,
        progress=progress,
        distributed=distributed,
    )


class _NativeView(HFView):
    """Native keys unchanged: each tensor is its own identity piece (for native output)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.native = state_dict
        self.adapter = Adapter("native", (), rules=())
        self.num_layers = None
        self.entries = {}
        for key in state_dict:
            t = state_dict[key]
            shape = tuple(t.shape)
            piece = HFPiece(start=(0,) * len(shape), dims=tuple(range(len(shape))), shape=shape, key=key, rule=_IDENTITY)
            self.entries[key] = HFEntry(key, key, piece, t.dtype)


def save_native(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a state dict under its own (native) keys, sharded like :func:`save_hf`.

    lazysd has no native checkpoint format beyond this: safetensors files of native keys plus
    an index, the input of ``lazysd convert --from native``.

    Example:
        >>> import tempfile, torch
        >>> out = save_native({"w": torch.ones(2)}, tempfile.mkdtemp() + "/n")
        >>> sorted(p.name for p in out.iterdir())
        ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
    """
    return _export(
        _NativeView(state_dict),
        out_dir,
        max_shard_size=max_shard_size,
        config=config,
        overwrite=overwrite,
        progress=progress,
        distributed=False,
    )


class SafetensorsFiles(Mapping[str, torch.Tensor]):
    """Tensors of a directory of safetensors files (index or not), each read when accessed.

    The reader for ``lazysd convert --from native``: shapes and dtypes come from the headers
    :class:`~lazysd.checkpoint.Checkpoint` validated; values are read with the ``safetensors``
    library, one at a time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path).absolute()
        # Checkpoint validates headers and the index; it needs config.json, which
        # --from native requires anyway.
        with Checkpoint(self.path) as ckpt:
            self._info = dict(ckpt.tensors)
            self.source_files = [self.path, *ckpt.files]
        self._open = {f: safe_open(str(f), framework="pt") for f in dict.fromkeys(i.file for i in self._info.values())}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._info:
            raise MissingKeyError(f"{self.path}: no key {key!r}")
        info = self._info[key]
        return _ShapeOnly(self._open[info.file], info)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._info)

    def __len__(self) -> int:
        return len(self._info)


class _ShapeOnly:
    """Stands in for a tensor until a slice of it is asked for (read through safetensors)."""

    def __init__(self, handle: Any, info: TensorInfo) -> None:
        self._handle = handle
        self._slice: Any = None
        self.key = info.key
        self.shape = torch.Size(info.shape)
        self.dtype = info.dtype

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if self._slice is None:
            self._slice = self._handle.get_slice(self.key)
        return self._slice[index]
