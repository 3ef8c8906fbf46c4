"""Pre-faulting fresh destination memory in bulk, so reads into it do not stop at every page.

A tensor that ``assign=True`` materializes is fresh memory: the first write to each 4 KiB
page traps into the kernel, which zeroes and maps it. Faulted one page at a time from inside
``pread`` and the transpose kernel that costs as much as the copy itself (measured on the
2-core build VM, 1 GiB of bf16: ~0.4-0.6 s of faults next to ~0.1 s of copying).
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) maps a whole range in one call, without a
trap per page; with :data:`enabled` set, the reader calls :func:`populate` once per fresh
tensor before its reads. Where the call is missing (other systems, older kernels)
:func:`populate` does nothing and pages fault as before: same bytes.

Why it is off by default (``assign=True`` of a 0.9 GiB Step3p5 checkpoint, fresh processes,
interleaved rounds on the 2-core VM while other work ran on it): one call per fresh tensor
against page-by-page faults gave per-round wall ratios of 0.91, 1.78, 1.78
(``bench_load.py`` b/B) in one run and 1.10, 0.13, 0.90 in another: no consistent gain. The
call zeroes every page on the calling thread, where faults taken inside the reads are spread
over the reader threads. One call per 8 MiB chunk on the read threads, and transparent huge
pages (``MADV_HUGEPAGE``: direct compaction on a machine whose memory other processes
fragment), were slower still, although the transpose kernel alone ran ~1.35x faster into
huge pages.

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
#: Whether this kernel has MADV_POPULATE_WRITE (False once it refused the call).
supported = _MADVISE is not None
#: Pre-fault fresh ``assign=True`` destinations: off by default, because it did not measure
#: faster on the 2-core build VM (see the module docstring); ``lazysd.memory.enabled = True``
#: opts in (``benchmarks/bench_load.py`` method B measures it against the default).
enabled = False


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
    global supported
    if not (enabled and supported) or t.device.type != "cpu":
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
            supported = False
        return False
    return True
