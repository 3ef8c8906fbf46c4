"""Page-cache measurements, independent of lazysd's own counters.

:func:`evict` drops a file's pages from the page cache; :func:`resident_pages` counts which
of its pages are cached, with ``mincore(2)`` on a private mapping that is never touched;
:func:`storage_bytes` counts what the process had read from storage (direct reads, which leave
no pages cached, too). Together they show which bytes a load really read, whatever lazysd's
counters claim.

Example:
    >>> evict(path); load(...); resident_pages(path)         # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def evict(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to drop ``path``'s clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_map(path: str | os.PathLike[str]) -> list[bool]:
    """For each page of ``path``, whether it is in the page cache."""
    size = Path(path).stat().st_size
    if size == 0:
        return []
    with open(path, "rb") as fh:
        m = mmap.mmap(fh.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        pages = (size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(m)
        try:
            if _libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed", str(path))
        finally:
            del anchor
        return [bool(v & 1) for v in vec]
    finally:
        m.close()


def resident_pages(path: str | os.PathLike[str]) -> int:
    """How many of ``path``'s pages are in the page cache."""
    return sum(resident_map(path))


def storage_bytes() -> int:
    """Bytes this process has had read from storage so far (``read_bytes`` of ``/proc/self/io``):
    buffered reads that missed the page cache and direct reads alike."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise OSError("no read_bytes in /proc/self/io")


def page_set(ranges: list[tuple[int, int]]) -> set[int]:
    """The pages that byte ranges ``(offset, length)`` of one file touch."""
    pages: set[int] = set()
    for offset, length in ranges:
        if length > 0:
            pages.update(range(offset // PAGE, (offset + length - 1) // PAGE + 1))
    return pages


def pages_touched(ranges: list[tuple[int, int]]) -> int:
    """Number of distinct pages that byte ranges ``(offset, length)`` of one file touch."""
    return len(page_set(ranges))
