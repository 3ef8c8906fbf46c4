"""Export phase 1, *plan files*: which tensor goes into which shard file, at which bytes.

Pure and deterministic: :func:`plan_files` turns ``(key, dtype, shape)`` entries into a
:class:`FileLayout` from metadata only, so every rank of a distributed export (and a
torch.distributed.checkpoint storage writer's coordinator) computes the same layout and can
check that it agrees with the others through :attr:`FileLayout.digest`.

Example:
    >>> import torch
    >>> layout = plan_files([("a", torch.bfloat16, (4, 4)), ("b", torch.float32, (8,))], "40B")
    >>> [(f.name, f.keys) for f in layout.files]
    [('model-00001-of-00002.safetensors', ('a',)), ('model-00002-of-00002.safetensors', ('b',))]
    >>> layout.slots["b"].file, layout.slots["b"].nbytes
    ('model-00002-of-00002.safetensors', 32)
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ExportError
from ..writer import header_bytes

__all__ = ["SHARD_NAME", "FileLayout", "ShardFile", "TensorSlot", "parse_size", "plan_files"]

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
FILE_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes

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
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(size)[:100])
        if not m or m.group(2).upper() not in _UNITS:
            raise ExportError(f"max_shard_size {str(size)[:100]!r} is not a size; use bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ExportError(f"max_shard_size must be positive, got {str(size)[:100]!r}")
    return value


@dataclass(frozen=True)
class TensorSlot:
    """Where one output tensor's bytes live."""

    key: str  # output key
    dtype: torch.dtype  # dtype as written
    shape: tuple[int, ...]  # shape as written
    file: str  # shard file name (relative to the output directory)
    offset: int  # file position of the tensor's first byte (header included)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


@dataclass(frozen=True)
class ShardFile:
    """One shard file: its name, its complete safetensors header and the keys it holds, in order."""

    name: str
    header: bytes  # length prefix + JSON header, padded: the file's first bytes
    keys: tuple[str, ...]
    size: int  # final file size in bytes


@dataclass(frozen=True)
class FileLayout:
    """The whole output: shard files, and each tensor's slot in them."""

    files: tuple[ShardFile, ...]
    slots: dict[str, TensorSlot]  # key -> slot, in file order

    @property
    def total_size(self) -> int:
        """Tensor bytes of the export (the index's ``metadata.total_size``)."""
        return sum(s.nbytes for s in self.slots.values())

    def index(self) -> dict[str, Any]:
        """The ``model.safetensors.index.json`` content."""
        return {"metadata": {"total_size": self.total_size}, "weight_map": {k: s.file for k, s in self.slots.items()}}

    @property
    def digest(self) -> str:
        """A hash of the layout, equal on two ranks exactly when their layouts are."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.name.encode() + b"\0" + f.header)
        return h.hexdigest()


def plan_files(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int | str) -> FileLayout:
    """Pack ``(key, dtype, shape)`` entries, in order, into files of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a file of its own. Files are named like
    transformers' ``save_pretrained`` names them (``model-00001-of-00003.safetensors``), even
    when there is one, so an index always goes with them.

    Raises:
        ExportError: no entries, a key given twice, a dtype safetensors cannot store, or a
            size that is not a size.
    """
    max_bytes = parse_size(max_shard_size)
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for key, dtype, shape in entries:
        nbytes = dtype.itemsize * math.prod(shape)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, dtype, tuple(int(d) for d in shape)))
        size += nbytes
    if not groups[-1]:
        raise ExportError("nothing to export: no tensors")
    files: list[ShardFile] = []
    slots: dict[str, TensorSlot] = {}
    for i, group in enumerate(groups):
        name = SHARD_NAME.format(index=i + 1, count=len(groups))
        try:
            head, offsets = header_bytes(group, FILE_METADATA)
        except (TypeError, ValueError) as e:
            raise ExportError(f"{name}: {e}") from None
        for key, dtype, shape in group:
            if key in slots:
                raise ExportError(f"tensor key {key[:200]!r} is given twice")
            slots[key] = TensorSlot(key, dtype, shape, name, len(head) + offsets[key][0])
        files.append(ShardFile(name, head, tuple(k for k, _, _ in group), len(head) + sum(slots[k].nbytes for k, _, _ in group)))
    return FileLayout(tuple(files), slots)
