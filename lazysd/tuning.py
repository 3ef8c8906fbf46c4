"""Read defaults chosen from the machine: cores the process may use, and the kind of storage.

A user who passes no ``threads=`` or ``chunk_bytes=`` gets :func:`default_threads` and
:func:`default_chunk_bytes` for the checkpoint's directory; explicit values always win.

* Threads: the reader's work is ``pread`` (a memory copy when warm) and the transpose kernel,
  both CPU work once the data is cached, so as many threads as cores this process is given
  (its affinity mask, and no more than ``torch.get_num_threads()`` where the user lowered
  that), never more: more threads than cores only contend (measured warm on the 2-core build
  VM, 0.81 GiB Step3p5: threads=2 3.08 GiB/s, threads=8 2.50). But at least two where the
  process may use two cores, even when torch was given one (``OMP_NUM_THREADS=1`` under
  torchrun, one rank per core): a rank with one thread waits for every read before it
  copies, and many small cold reads (a column shard's rows) run one after another — a
  2-rank ``dcp.load`` of column-split experts took twice as long with one thread.
* Network filesystems (NFS, CIFS, Lustre, FUSE mounts, ...): each request waits a round trip,
  so more requests are kept in flight (4 per core, at most 32) in larger chunks.
* Memory filesystems (tmpfs): nothing to wait for; the default thread count and chunk.

Example:
    >>> default_threads() >= 1
    True
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MiB = 1 << 20
_NETWORK = (
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "lustre",
    "gpfs",
    "beegfs",
    "ceph",
    "glusterfs",
    "9p",
    "afs",
    "fuse",
)
_MEMORY = ("tmpfs", "ramfs")


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n)


def filesystem_type(path: str | os.PathLike[str], *, mounts: str | None = None) -> str | None:
    """The type of the filesystem ``path`` lies on, from the mount table (``mounts``: its
    text, default ``/proc/self/mounts``), or None where there is none."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def storage_kind(path: str | os.PathLike[str]) -> str:
    """``"network"``, ``"memory"`` or ``"local"`` (also when it cannot be told)."""
    kind = filesystem_type(path) or ""
    if kind in _MEMORY:
        return "memory"
    if kind.split(".")[0] in _NETWORK:
        return "network"
    return "local"


def default_threads(path: str | os.PathLike[str] | None = None) -> int:
    """Reader threads for a checkpoint at ``path`` (see the module docstring)."""
    n = min(cores(), max(2, torch.get_num_threads()))
    if path is not None and storage_kind(path) == "network":
        return min(32, 4 * cores())
    return n


def default_chunk_bytes(path: str | os.PathLike[str] | None = None) -> int:
    """Target bytes of one read for a checkpoint at ``path`` (see the module docstring)."""
    if path is not None and storage_kind(path) == "network":
        return 16 * MiB
    return 8 * MiB
