"""Safetensors headers: the dtype table, :class:`TensorInfo`, and the checks made on a header.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and ``data_offsets``, then the data section. :func:`parse_header`
validates a header completely before any tensor byte is trusted; :class:`~lazysd.checkpoint.Checkpoint`
(local files) and the remote store (ranged GETs) both go through it.

Example:
    >>> import struct, tempfile, os
    >>> header = b'{"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}'
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> _ = open(path, "wb").write(struct.pack("<Q", len(header)) + header + bytes(4))
    >>> fd = os.open(path, os.O_RDONLY)
    >>> tensors, meta = parse_header(Path(path), fd, os.fstat(fd).st_size)
    >>> tensors["w"].shape, tensors["w"].nbytes
    ((2,), 4)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FileChangedError, HeaderError, repr_cut

# A real header is a few MB at most (DeepSeek-V3's largest shard: ~100 KB). The cap makes a
# file that claims a 2**60-byte header fail before anything is allocated.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# torch sizes are int64: a larger dimension (possible in a zero-element tensor) could not be built.
MAX_DIM = 2**63 - 1

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one HF tensor lives on disk. Known from the header alone."""

    key: str
    file: Path  # absolute path of the safetensors file
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element in the file

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _fail(exc: type[Exception], file: Path, key: str | None, what: str) -> Exception:
    where = f"{file}" if key is None else f"{file}, key {key!r}"
    return exc(f"{where}: {what}")


def parse_header(file: Path, fd: int, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate one safetensors header.

    Returns the tensors it describes and its ``__metadata__``. Every check the format allows
    is made here, before any tensor byte is trusted: sizes, offsets inside the data section,
    no overlaps and no holes, element counts matching ``dtype x shape``.
    """
    header_len = header_length(file, os.pread(fd, 8, 0), file_size)
    return parse_header_bytes(file, os.pread(fd, header_len, 8), header_len, file_size)


def header_length(file: Any, prefix: bytes, file_size: int) -> int:
    """The header length a file's 8-byte prefix states, checked against the file's size."""
    if file_size < 8:
        raise _fail(
            HeaderError,
            file,
            None,
            f"file is {file_size} bytes, too short for a safetensors header (8-byte length prefix)",
        )
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_HEADER_BYTES:
        raise _fail(HeaderError, file, None, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if header_len > file_size - 8:
        raise _fail(
            HeaderError,
            file,
            None,
            f"header length {header_len} runs past the end of the {file_size}-byte file (truncated?)",
        )
    return header_len


def parse_header_bytes(
    file: Any, raw: bytes, header_len: int, file_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """:func:`parse_header` on header bytes already read (``raw``: the ``header_len`` bytes after the prefix)."""
    header = _header_json(file, raw, header_len)
    metadata = _metadata(file, header.pop("__metadata__", None))
    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        tensors[key] = _tensor(file, key, entry, data_start, data_size)
    _check_back_to_back(file, header, data_size)
    return tensors, metadata


def _header_json(file: Any, raw: bytes, header_len: int) -> dict[str, Any]:
    """The header as a JSON object, duplicate keys refused."""
    if len(raw) != header_len:
        raise _fail(FileChangedError, file, None, f"short read of the header ({len(raw)} of {header_len} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(HeaderError, file, None, f"header is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise _fail(HeaderError, file, k, "key appears twice in the header")
            out[k] = v
        return out

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise _fail(HeaderError, file, None, f"header is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise _fail(HeaderError, file, None, "header JSON is nested too deeply") from None
    except HeaderError:
        raise
    except ValueError as e:  # e.g. an integer literal of more than 4300 digits
        raise _fail(HeaderError, file, None, f"header JSON holds an unreadable value ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise _fail(HeaderError, file, None, f"header must be a JSON object, got {type(header).__name__}")
    return header


def _metadata(file: Any, metadata: Any) -> dict[str, str]:
    """``__metadata__``: absent or null means none; anything else must be strings to strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        kind = type(metadata).__name__
        raise _fail(HeaderError, file, "__metadata__", f"must be an object of string keys to string values, got {kind}")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise _fail(HeaderError, file, "__metadata__", f"value of {k!r} must be a string, got {type(v).__name__}")
    return metadata


def _tensor(file: Any, key: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    """One header entry, checked: dtype known, shape valid, offsets inside the data section and matching the size."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(HeaderError, file, key, "entry must be an object with exactly 'dtype', 'shape' and 'data_offsets'")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(HeaderError, file, key, f"unknown dtype {repr_cut(dtype_name)} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        raise _fail(HeaderError, file, key, f"shape must be a list of non-negative integers, got {repr_cut(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        where = f"the {data_size}-byte data section"
        raise _fail(
            HeaderError, file, key, f"data_offsets {repr_cut(offsets)} are not a [begin, end] range inside {where}"
        )
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        span = offsets[1] - offsets[0]
        raise _fail(
            HeaderError, file, key, f"data_offsets span {span} bytes but {dtype_name} x {shape} needs {expected}"
        )
    return TensorInfo(key, file, dtype, tuple(shape), data_start + offsets[0])


def _check_back_to_back(file: Any, header: dict[str, Any], data_size: int) -> None:
    """The format requires the data section to be exactly the tensors, back to back."""
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], key) for key, entry in header.items())
    pos, prev = 0, None
    for begin, end, key in spans:
        if begin < pos:
            raise _fail(
                HeaderError, file, key, f"data overlaps tensor {prev!r} (starts at {begin}, {prev!r} ends at {pos})"
            )
        if begin > pos:
            raise _fail(HeaderError, file, key, f"{begin - pos} unclaimed bytes before this tensor (at {pos}..{begin})")
        pos, prev = end, key
    if pos != data_size:
        raise _fail(HeaderError, file, None, f"data section is {data_size} bytes but the tensors cover {pos}")
