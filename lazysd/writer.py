"""Streaming safetensors writer that never needs the whole file in memory.

The header is written first, the file is sized to its final length, and tensor bytes land at
their offsets with ``os.pwrite`` — one tensor (or one slice of a tensor) at a time, from any
number of threads. The file appears under its final name only on :meth:`SafetensorsWriter.commit`.

Example:
    >>> import torch, tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
    >>> path = pathlib.Path(tmp.name) / "x.safetensors"
    >>> entries = [("a", torch.bfloat16, (2, 3)), ("b", torch.float32, (4,))]
    >>> with SafetensorsWriter(path, entries) as w:
    ...     w.write("a", torch.ones(2, 3, dtype=torch.bfloat16))
    ...     w.write("b", torch.arange(4.0))
    >>> path.stat().st_size
    156
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import torch

from .errors import ExportDTypeError, MissingKeyError, WriterError
from .header import DTYPES
from .transpose import contiguous

__all__ = [
    "DTYPE_TO_NAME",
    "NAME_TO_DTYPE",
    "SafetensorsWriter",
    "header_bytes",
    "pwrite_all",
    "save_file",
]

# The one dtype table is checkpoint.DTYPES (safetensors name -> dtype); these are its two directions.
NAME_TO_DTYPE: dict[str, torch.dtype] = dict(DTYPES)
DTYPE_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

Entry = tuple[str, torch.dtype, tuple[int, ...]]

# Linux caps one write at 0x7FFFF000 bytes; larger tensors are written in pieces.
_MAX_PWRITE = 1 << 30


def pwrite_all(fd: int, buf: memoryview, pos: int) -> None:
    """Write all of ``buf`` at file position ``pos`` (in pieces of at most ``_MAX_PWRITE``)."""
    while len(buf):
        n = os.pwrite(fd, buf[:_MAX_PWRITE], pos)
        buf, pos = buf[n:], pos + n


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


def header_bytes(
    entries: Sequence[Entry], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Build a safetensors header for tensors laid out back to back in ``entries`` order.

    Args:
        entries: ``(key, dtype, shape)`` per tensor, in file order.
        metadata: optional ``__metadata__`` (string to string).

    Returns:
        The 8-byte little-endian length plus the JSON header (space-padded to a multiple of 8,
        so the data section starts 8-byte aligned), and each key's ``(begin, end)`` byte range
        relative to the start of the data section.

    Example:
        >>> head, offsets = header_bytes([("w", torch.float32, (2, 2))])
        >>> len(head) % 8, offsets
        (0, {'w': (0, 16)})
    """
    header: dict[str, object] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ExportDTypeError(f"safetensors metadata must map str to str, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for key, dtype, shape in entries:
        if key == "__metadata__" or key in offsets:
            raise WriterError(f"tensor key {key!r} is reserved or given twice")
        if dtype not in DTYPE_TO_NAME:
            raise ExportDTypeError(
                f"tensor {key!r}: dtype {dtype} has no safetensors name; "
                f"supported: {sorted(DTYPE_TO_NAME.values())}"
            )
        shape = tuple(int(d) for d in shape)
        end = pos + _nbytes(dtype, shape)
        header[key] = {"dtype": DTYPE_TO_NAME[dtype], "shape": list(shape), "data_offsets": [pos, end]}
        offsets[key] = (pos, end)
        pos = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, atomically.

    Data goes to ``.{name}.tmp-{pid}-{random}`` next to ``path``; :meth:`commit` fsyncs it and renames it
    onto ``path``, :meth:`abort` deletes it. Used as a context manager it commits on success and
    aborts on an exception. :meth:`write` is thread-safe (``pwrite`` shares no file position),
    so several threads may fill different parts of one tensor via ``byte_offset``.

    Args:
        path: final file path.
        entries: ``(key, dtype, shape)`` per tensor, in file order.
        metadata: optional ``__metadata__``.
        sparse: data will not (all) be written: unwritten ranges stay file holes that read back
            as zeros and take no disk space, and :meth:`commit` does not require every byte to
            have been written. Meant for huge shape-only test files.

    Example:
        >>> import torch, tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
        >>> path = pathlib.Path(tmp.name) / "big.safetensors"
        >>> with SafetensorsWriter(path, [("w", torch.bfloat16, (1 << 20, 1024))], sparse=True):
        ...     pass
        >>> path.stat().st_size > 2 * 2**30
        True
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[Entry],
        *,
        metadata: dict[str, str] | None = None,
        sparse: bool = False,
    ) -> None:
        self.path = Path(path)
        self.sparse = sparse
        self._entries = {key: (dtype, tuple(int(d) for d in shape)) for key, dtype, shape in entries}
        head, self._offsets = header_bytes(entries, metadata)
        self._data_start = len(head)
        self.size = len(head) + (max((e for _, e in self._offsets.values()), default=0))
        # pid and a random part: two writers of one path (threads, processes) never share a temporary.
        self.tmp_path = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        # key -> byte ranges written so far (relative to the key's start); checked at commit.
        self._written: dict[str, list[tuple[int, int]]] = {key: [] for key in self._offsets}
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            pwrite_all(self._fd, memoryview(head), 0)
            # Size the file now: unwritten ranges are holes, so sparse files cost no disk.
            os.ftruncate(self._fd, self.size)
        except BaseException:
            self.abort()
            raise

    def write(self, key: str, tensor: torch.Tensor, *, byte_offset: int = 0) -> None:
        """Write ``tensor``'s raw bytes at ``key``'s offset plus ``byte_offset``.

        The tensor must have the key's dtype; one on another device (a GPU) is copied to
        the CPU first, whole. A write at offset 0 of the key's full
        byte size must also have the key's shape; partial writes (slices of rows, say) only need
        to fit inside the key's range.

        Example:
            >>> import torch, tempfile, pathlib
            >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
            >>> path = pathlib.Path(tmp.name) / "rows.safetensors"
            >>> with SafetensorsWriter(path, [("w", torch.float32, (4, 2))]) as w:
            ...     w.write("w", torch.zeros(2, 2))                   # rows 0..1
            ...     w.write("w", torch.ones(2, 2), byte_offset=16)    # rows 2..3
        """
        if self._fd is None:
            raise WriterError(f"{self.path}: writer is already committed or aborted")
        if key not in self._offsets:
            raise MissingKeyError(f"{self.path}: key {key!r} is not among the writer's entries")
        dtype, shape = self._entries[key]
        begin, end = self._offsets[key]
        if tensor.dtype != dtype:
            raise ExportDTypeError(f"{self.path}: key {key!r} expects dtype {dtype}, got {tensor.dtype}")
        if tensor.device.type == "meta":
            raise WriterError(f"{self.path}: key {key!r}: tensor is on the meta device (it holds no data)")
        nbytes = tensor.numel() * tensor.element_size()
        if byte_offset < 0 or byte_offset + nbytes > end - begin:
            raise WriterError(
                f"{self.path}: key {key!r}: {nbytes} bytes at byte_offset {byte_offset} do not fit "
                f"its {end - begin} bytes"
            )
        if byte_offset == 0 and nbytes == end - begin and tuple(tensor.shape) != shape:
            raise WriterError(
                f"{self.path}: key {key!r} expects shape {shape}, got {tuple(tensor.shape)}"
            )
        # reshape(-1) first: view(uint8) refuses 0-dim tensors; both steps are views, so the only
        # possible copy is contiguous() of a non-contiguous input.
        flat = contiguous(tensor.detach().cpu()).reshape(-1).view(torch.uint8)
        pwrite_all(self._fd, memoryview(flat.numpy()), self._data_start + begin + byte_offset)
        with self._lock:
            self._written[key].append((byte_offset, byte_offset + nbytes))

    def _missing(self) -> list[str]:
        missing = []
        for key, (begin, end) in self._offsets.items():
            covered = 0
            for lo, hi in sorted(self._written[key]):
                if lo > covered:
                    break
                covered = max(covered, hi)
            if covered < end - begin:
                missing.append(key)
        return missing

    def commit(self) -> Path:
        """Fsync the temporary file and rename it onto ``path``; returns ``path``.

        Unless ``sparse``, every byte of every key must have been written, else the temporary
        file is removed and :class:`~lazysd.errors.WriterError` (a ``ValueError``) names the
        incomplete keys.
        """
        if self._fd is None:
            raise WriterError(f"{self.path}: writer is already committed or aborted")
        if not self.sparse and (missing := self._missing()):
            self.abort()
            raise WriterError(
                f"{self.path}: {len(missing)} key(s) not fully written, e.g. {missing[:3]}; "
                "write them or pass sparse=True"
            )
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file; ``path`` is left untouched. Idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __repr__(self) -> str:
        state = "open" if self._fd is not None else "closed"
        return f"SafetensorsWriter({str(self.path)!r}, {len(self._offsets)} tensors, {self.size} bytes, {state})"


def save_file(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save CPU tensors to one safetensors file, in the given order.

    Example:
        >>> import torch, tempfile, pathlib
        >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
        >>> path = pathlib.Path(tmp.name) / "m.safetensors"
        >>> save_file({"w": torch.eye(2)}, path, metadata={"format": "pt"}).name
        'm.safetensors'
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    entries = [(key, t.dtype, tuple(t.shape)) for key, t in items]
    with SafetensorsWriter(path, entries, metadata=metadata) as writer:
        for key, t in items:
            writer.write(key, t)
    return Path(path)
