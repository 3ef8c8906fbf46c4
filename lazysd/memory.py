"""Pre-faulting fresh destination memory in bulk, so reads into it do not stop at every page.

A tensor that ``assign=True`` materializes is fresh memory: the first write to each 4 KiB
page traps into the kernel, which zeroes and maps it. Faulted one page at a time from inside
``pread`` that costs as much as the read itself (measured on the 2-core build VM, 1 GiB of
bf16: ~0.4-0.6 s of faults next to ~0.1 s of copying). ``madvise(MADV_POPULATE_WRITE)``
(Linux 5.14+) maps a whole range in one call, without a trap per page; the reader calls
:func:`populate` on each chunk's destination on its read threads, so pages of one chunk are
mapped while other chunks are read. Where the call is missing (other systems, older
kernels) :func:`populate` does nothing and pages fault as before: same bytes, only slower.

Example:
    >>> t = torch.empty(1 << 20, dtype=torch.uint8)
    >>> populate(t)   # True where the kernel has MADV_POPULATE_WRITE
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

PAGE = mmap.PAGESIZE
MADV_HUGEPAGE = 14  # linux/mman.h
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14
#: Tensors from this size on are given transparent huge pages where the kernel offers them
#: on request. Always their own mapping (glibc's mmap threshold is at most 32 MiB), so the
#: advice covers that mapping whole and never splits a heap region.
HUGE_MIN = 64 << 20
#: Smallest span worth a call: below it, the few page faults cost less than the syscall.
MIN_BYTES = 256 << 10


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()
#: False once the kernel refused MADV_POPULATE_WRITE (then populate() is a no-op); tests
#: set it to False to run the portable path.
enabled = _MADVISE is not None


def _thp_on_request() -> bool:
    """True where transparent huge pages are given to regions that ask (mode ``madvise``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return "[madvise]" in fh.read()
    except OSError:
        return False


huge = _MADVISE is not None and _thp_on_request()


def advise_huge(t: torch.Tensor) -> bool:
    """Ask for transparent huge pages for fresh CPU tensor ``t`` (at least :data:`HUGE_MIN`).

    A native expert tensor is written through a transpose that touches a new 4 KiB page
    every few cache lines; with 2 MiB pages the TLB misses of that walk mostly go away
    (measured on the 2-core build VM: the fused read-and-transpose ~1.35x faster), and
    pre-faulting maps 512x fewer pages. Only the tensor's own pages are advised, so no
    memory is added. Returns True if the advice was given.
    """
    if not (huge and enabled) or t.device.type != "cpu" or t.numel() * t.element_size() < HUGE_MIN:
        return False
    assert _MADVISE is not None
    addr, nbytes = span(t)
    lo = addr // PAGE * PAGE
    hi = -(-(addr + nbytes) // PAGE) * PAGE
    return _MADVISE(lo, hi - lo, MADV_HUGEPAGE) == 0


def span(t: torch.Tensor) -> tuple[int, int]:
    """``(address, bytes)`` of the memory a CPU tensor view's elements lie in (first to last)."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0)
    return t.data_ptr(), (last + 1) * t.element_size()


def populate(t: torch.Tensor) -> bool:
    """Map the whole pages of CPU tensor ``t``'s span writable in one call; True if done.

    Only pages wholly inside the span are touched (the ragged ends fault as usual), and a
    populated page keeps its contents: calling it on memory already in use is harmless.
    """
    global enabled
    if not enabled or t.device.type != "cpu":
        return False
    addr, nbytes = span(t)
    lo = -(-addr // PAGE) * PAGE
    hi = (addr + nbytes) // PAGE * PAGE
    if hi - lo < MIN_BYTES:
        return False
    assert _MADVISE is not None
    if _MADVISE(lo, hi - lo, MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL/ENOSYS/EOPNOTSUPP: this kernel lacks it; stop asking
            enabled = False
        return False
    return True
