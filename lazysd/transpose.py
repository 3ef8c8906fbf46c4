"""Transposed copies into native layouts, the one compute-heavy step of a load.

Every grouped expert tensor's native layout is its HF layout with the last two dims swapped, so
each expert byte is copied once through a transpose. :func:`copy_into` does that copy with
lazysd's compiled kernel (``lazysd/_transpose.c``: cache-blocked SIMD blocks, AVX-512 or AVX2
where the CPU has them and SSE2 elsewhere on x86-64, on ``torch.get_num_threads()`` threads,
GIL released) and falls back to torch where the kernel is not built or does not apply (other
devices, a cast on the way).

Measured on the 2-core build machine (bf16, a [16, 1280, 4096] block): torch's strided
``copy_`` 0.3-0.6 GB/s, torch copies in 16-column strips 0.5-1.3 GB/s. The kernel, on the
benchmark checkpoint's [40, 512, 1024] and [40, 1024, 512] bf16 experts (medians of 5 runs,
GiB/s, the former 8x8 SSE2 kernel -> AVX-512): :func:`copy_into` 5.7 -> 10.5 on one thread
(a memcpy of the same bytes: 8.2), :func:`read_transposed` 3.9 -> 6.0 (a plain ``pread`` of
the same bytes: 6.2); column halves of a wider destination 5.7 -> 8.9 and 4.0 -> 5.3. The
full table is in ``lazysd/_transpose.c``.

:func:`read_many` runs a fill's reads of cached bytes, plain and transposing, in one call of
the kernel on a few threads it keeps, with the GIL released once (the warm path of
:class:`lazysd.reader.Reader`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

try:
    from . import _transpose
except ImportError:  # built from source without a C compiler: the torch path still works
    _transpose = None

#: Below this many elements the kernel's thread start-up costs more than it saves.
_THREADED_NUMEL = 1 << 20


def kernel_available() -> bool:
    """True if the compiled transpose kernel was built with this install."""
    return _transpose is not None


def kernel_isa() -> str | None:
    """The instruction set the compiled kernel runs on here, or None where it is not built.

    ``"avx512"``, ``"avx2"`` or ``"sse2"`` on x86-64 (the widest the CPU has, chosen at import;
    the build itself targets any x86-64), ``"scalar"`` elsewhere.
    """
    return None if _transpose is None else _transpose.isa()


def _kernel_dest(dest: torch.Tensor) -> bool:
    """``dest`` is something the kernel can write: CPU, rows contiguous, 1/2/4/8-byte elements."""
    return (
        _transpose is not None
        and dest.is_cpu
        and dest.dim() >= 2
        and dest.stride(-1) == 1
        and dest.element_size() in (1, 2, 4, 8)
        and dest.numel() > 0
    )


def _kernel_applies(dest: torch.Tensor, src: torch.Tensor) -> bool:
    return (
        _kernel_dest(dest)
        and dest.shape == src.shape
        and dest.dtype == src.dtype
        and src.is_cpu
        and src.stride(-2) == 1
        and src.stride(-1) != 1
    )


def copy_into(dest: torch.Tensor, src: torch.Tensor, *, threads: int | None = None) -> None:
    """``dest.copy_(src)``, fast when ``src`` is a transposed view of row-major memory.

    ``dest``'s rows must be contiguous and ``src``'s columns (a transposed staging chunk,
    ``buf.transpose(-1, -2)`` or a permutation ending that way); anything else is a plain
    ``copy_``. ``dest`` must not overlap ``src``. ``threads``: the kernel's threads (default:
    ``torch.get_num_threads()`` for copies of 1M elements or more, else 1).

    Example:
        >>> hf = torch.arange(6, dtype=torch.bfloat16).view(2, 3)
        >>> native = torch.empty(3, 2, dtype=torch.bfloat16)
        >>> copy_into(native, hf.t())
        >>> torch.equal(native, hf.t())
        True
    """
    if not _kernel_applies(dest, src):
        _copy_torch(dest, src)
        return
    rows, cols = dest.shape[-2:]
    batch = dest.shape[-3] if dest.dim() >= 3 else 1
    db = dest.stride(-3) if dest.dim() >= 3 else 0
    sb = src.stride(-3) if src.dim() >= 3 else 0
    if threads is None:
        threads = torch.get_num_threads() if dest.numel() >= _THREADED_NUMEL else 1
    z = dest.element_size()
    # Dims before the last three (none in any native layout so far) are walked here.
    for outer in itertools.product(*map(range, dest.shape[:-3])):
        d, s = dest[outer] if outer else dest, src[outer] if outer else src
        _transpose.copy(
            d.data_ptr(), s.data_ptr(), batch, rows, cols, db, dest.stride(-2), sb, src.stride(-1), z, threads
        )


def contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``, through :func:`copy_into` (the export direction: native -> HF)."""
    if t.is_contiguous():
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    copy_into(out, t)
    return out


def read_transposed(fd: int, offset: int, dest: torch.Tensor) -> int:
    """Read a dense array from file ``fd`` at ``offset`` and write its transpose into ``dest``.

    ``dest`` is ``[rows, cols]`` or ``[batch, rows, cols]`` with contiguous rows; the file holds
    ``[cols, rows]`` (``[batch, cols, rows]``) of the same dtype. Source rows are read a
    512 KiB block at a time and transposed while the block is still in cache, so each byte
    crosses memory once each way. Returns the bytes read: fewer than the array's size only
    where the file ended. Needs the kernel (:func:`fused_read_applies`); runs on the calling
    thread with the GIL released.
    """
    assert _transpose is not None
    return _transpose.read(fd, offset, *_transposed_dest(dest))


def copy_transposed(address: int, dest: torch.Tensor) -> None:
    """What :func:`read_transposed` writes into ``dest``, from memory instead of a file: the
    row-major ``[cols, rows]`` (``[batch, cols, rows]``) array at ``address``, of ``dest``'s
    dtype, transposed into ``dest``. On the calling thread, with the GIL released; needs the
    kernel (:func:`fused_read_applies`).

    Example:
        >>> hf = torch.arange(6, dtype=torch.bfloat16).view(2, 3)
        >>> native = torch.empty(3, 2, dtype=torch.bfloat16)
        >>> copy_transposed(hf.data_ptr(), native)  # doctest: +SKIP
        >>> torch.equal(native, hf.t())  # doctest: +SKIP
        True
    """
    assert _transpose is not None
    dst, batch, rows, cols, dst_b, dst_r, z = _transposed_dest(dest)
    _transpose.copy(dst, address, batch, rows, cols, dst_b, dst_r, rows * cols, rows, z, 1)


def _transposed_dest(dest: torch.Tensor) -> tuple[int, ...]:
    """``(address, batch, rows, cols, batch stride, row stride, itemsize)`` of a ``[rows,
    cols]`` or ``[batch, rows, cols]`` destination with contiguous rows, as the kernel reads them."""
    return _transposed_layout(dest.data_ptr(), dest.shape, dest.stride(), dest.element_size())


def _transposed_layout(address: int, shape: Sequence[int], stride: Sequence[int], itemsize: int) -> tuple[int, ...]:
    if len(shape) == 2:
        return (address, 1, shape[0], shape[1], 0, stride[0], itemsize)
    return (address, shape[0], shape[1], shape[2], stride[0], stride[1], itemsize)


def read_job(fd: int, offset: int, dest: torch.Tensor, *, transposed: bool) -> tuple[int, ...]:
    """One job of :func:`read_many`: ``dest.nbytes`` bytes at ``offset`` read into ``dest``
    (contiguous), or, ``transposed``, what :func:`read_transposed` reads into it."""
    if not transposed:
        if not dest.is_contiguous():
            raise ValueError("a plain read job needs a contiguous destination")
        return (fd, offset, dest.data_ptr(), dest.numel() * dest.element_size())
    return (fd, offset, *_transposed_dest(dest))


def transposed_job(
    fd: int, offset: int, address: int, shape: Sequence[int], stride: Sequence[int], itemsize: int
) -> tuple[int, ...]:
    """What ``read_job(fd, offset, dest, transposed=True)`` is for a ``dest`` of this
    address (of its first element), shape, element strides and item size, no tensor needed."""
    return (fd, offset, *_transposed_layout(address, shape, stride, itemsize))


def read_many(jobs: list[tuple[int, ...]], threads: int, *, probe: bool) -> list[int]:
    """Run :func:`read_job` jobs on ``threads`` threads (the calling one included) in one
    call with the GIL released; the bytes each read.

    A job gets all its bytes, or fewer where the file ended or a read failed (``-errno``):
    the caller reads such a job again its own way, to report it. ``probe``: a job whose
    first or last byte is not in the page cache is not read (``-errno.EAGAIN``), for the
    caller to read cold bytes in bulk. Needs the kernel (:func:`kernel_available`).

    Example:
        >>> out = torch.empty(4096, dtype=torch.uint8)
        >>> read_many([read_job(fd, 0, out, transposed=False)], 2, probe=False)  # doctest: +SKIP
        [4096]
    """
    assert _transpose is not None
    return _transpose.reads(jobs, threads, probe)


def fused_read_applies(dest: torch.Tensor) -> bool:
    """True if :func:`read_transposed` can fill ``dest`` (a CPU tensor with contiguous rows)."""
    return dest.is_cpu and fused_read_fits(dest.shape, dest.stride(), dest.element_size())


def fused_read_fits(shape: tuple[int, ...], stride: tuple[int, ...], itemsize: int) -> bool:
    """True if :func:`read_transposed` can fill a CPU tensor of this shape, stride and item size.

    Plain values, so read plans decide it for destinations they do not hold.
    """
    return (
        _transpose is not None
        and 2 <= len(shape) <= 3
        and stride[-1] == 1
        and itemsize in (1, 2, 4, 8)
        and math.prod(shape) > 0
    )


def _copy_torch(dest: torch.Tensor, src: torch.Tensor) -> None:
    """``dest.copy_(src)``, in strips of 16 destination columns when ``src`` is transposed.

    A transposed copy reads one side with a large stride; narrow strips keep both sides in
    cache (2-3x torch's single strided copy on the build machine).
    """
    if dest.dim() >= 2 and src.stride(-1) != 1 and dest.is_cpu and dest.stride(-1) == 1 and dest.shape[-1] > 16:
        for j in range(0, dest.shape[-1], 16):
            dest[..., j : j + 16].copy_(src[..., j : j + 16])
    else:
        dest.copy_(src)
