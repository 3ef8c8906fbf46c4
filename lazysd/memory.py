"""Pre-faulting fresh destination memory in bulk, so reads into it do not stop at every page.

A tensor that ``assign=True`` materializes is fresh memory: the first write to each 4 KiB
page traps into the kernel, which zeroes and maps it. Faulted one page at a time from inside
``pread`` and the transpose kernel that costs as much as the copy itself (measured on the
2-core build VM, 1 GiB of bf16: ~0.4-0.6 s of faults next to ~0.1 s of copying).
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) maps a whole range in one call, without a
trap per page; the reader calls :func:`populate` once per fresh tensor before its reads.
Where the call is missing (other systems, older kernels) :func:`populate` does nothing and
pages fault as before: same bytes, only slower.

What was measured and left out (``assign=True`` of a 0.9 GiB Step3p5 checkpoint, fresh
processes, interleaved rounds on the busy 2-core VM): one call per fresh tensor 2.99-3.03 s
where page-by-page faults took 3.34 s in the same rounds; one call per 8 MiB chunk on the
read threads was slower than no call at all (5.0-11 s: the calls contend with the reads for
the two cores); transparent huge pages (``MADV_HUGEPAGE``) doubled the time (direct
compaction on a machine whose memory is fragmented by other processes), although the
transpose kernel alone ran ~1.35x faster into huge pages.

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
MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14
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
