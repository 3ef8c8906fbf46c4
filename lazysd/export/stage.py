"""Export phases *create*, *write*, *commit* and *abort*: an output built aside, switched in at once.

An export never writes into its output directory. The coordinator (rank 0) creates a hidden
sibling directory ``.<name>.lazysd-stage-<token>`` holding every shard file, sized and with
its header (:meth:`Stage.create`); every writer ``pwrite`` s blocks of tensors at their
offsets there (:meth:`Stage.write`) and fsyncs them (:meth:`Stage.flush`); the coordinator
then writes the index and config.json into the stage and puts it in place of the output
directory by one atomic rename (:meth:`Stage.commit`). A reader of the output directory sees
the old export or the new one, never a mix, and an interrupted export leaves only a hidden
sibling that the next export into the same directory removes.

Replacing a non-empty directory (``overwrite=True``): the files that stay (tokenizer,
README, anything that is not weights, index or a replaced config.json) are hard-linked (or,
across filesystems, copied) into the stage first; the stage and the old directory are then
exchanged atomically (Linux ``renameat2(RENAME_EXCHANGE)``, local filesystems). Where the
filesystem cannot exchange (NFS, other systems) the old directory is renamed aside and the
stage renamed in: between these two renames the output directory is briefly absent (never
mixed), and an export interrupted there is rolled back by the next export into it.

:class:`ExportLock` keeps two exports out of one directory at once: an ``flock`` on
``.<name>.lazysd-lock`` next to it (released by the kernel when its holder dies, so a killed
export leaves no stale lock; over NFS the client maps it to a server-side lock). The loser
gets :class:`~lazysd.errors.ExportError` at once. Should locks not work on some filesystem,
the atomic commit still never mixes two exports: into a new directory the second commit
fails, over an existing one the last commit wins whole.

Example (the phases as a storage writer drives them):
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from lazysd.export.layout import plan_files
    >>> out = Path(tempfile.mkdtemp()) / "ckpt"
    >>> layout = plan_files([("w", torch.float32, (2, 3))], "5GB")
    >>> with ExportLock(out):
    ...     stage = Stage(out, layout, token="0")
    ...     stage.create()
    ...     _ = stage.write("w", (1, 0), torch.ones(1, 3))    # row 1 ...
    ...     _ = stage.write("w", (0, 0), torch.zeros(1, 3))   # ... and row 0, in any order
    ...     stage.flush()
    ...     _ = stage.commit()
    >>> sorted(p.name for p in out.iterdir())
    ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import torch

from ..checkpoint import INDEX_NAME
from ..errors import ExportError
from ..geometry import byte_runs
from ..writer import pwrite_all
from .layout import FileLayout, TensorSlot

__all__ = ["ExportLock", "Stage", "io_error", "recover", "stage_path"]

STAGE_MARK = ".lazysd-stage-"
ASIDE_MARK = ".lazysd-old-"
LOCK_MARK = ".lazysd-lock"
_LEGACY_TMP = ".tmp-"  # temporaries of exports made before staging directories (``.name.tmp-token``)
CONFIG_NAME = "config.json"


def io_error(what: str, path: Path | str, e: OSError) -> ExportError:
    """An :class:`ExportError` for an OS failure, naming the path and the OS's reason."""
    reason = e.strerror or str(e)
    hint = " (the disk or quota is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    hint = hint or (" (a file size limit, ulimit -f, was reached)" if e.errno == errno.EFBIG else "")
    return ExportError(f"{path}: {what} failed: [Errno {e.errno}] {reason}{hint}; nothing was changed in the output directory")


def stage_path(out_dir: Path, token: str) -> Path:
    """The staging directory of export ``token`` into ``out_dir``."""
    return out_dir.parent / f".{out_dir.name}{STAGE_MARK}{token}"


# ---- exclusion -----------------------------------------------------------------------------

_held: set[Path] = set()  # lock files this process holds (flock does not exclude one process's threads over NFS)
_held_lock = threading.Lock()


class ExportLock:
    """Exclusive right to export into ``out_dir``, for the length of a ``with`` block.

    Raises:
        ExportError: another export (this process or another one, on this host or, where the
            filesystem supports locks, another host) holds it; or the lock file cannot be made.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir.parent / f".{self.out_dir.name}{LOCK_MARK}"
        self._fd: int | None = None

    def __enter__(self) -> Self:
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise io_error("creating the parent directory", self.out_dir.parent, e) from e
        with _held_lock:
            if self.path in _held:
                raise self._busy("this process")
            while True:  # the holder unlinks the file on release: retry until we lock the live one
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as e:
                    raise io_error("creating the export lock", self.path, e) from e
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    holder = _read_holder(fd)
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        raise self._busy(holder) from None
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        # A filesystem without locks: the atomic commit alone keeps exports whole.
                        warnings.warn(f"{self.path}: the filesystem cannot lock ({e.strerror}); concurrent exports into {self.out_dir} are not excluded", stacklevel=3)
                        return self
                    raise io_error("locking", self.path, e) from e
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            self._fd = fd
            _held.add(self.path)
        return self

    def _busy(self, holder: str) -> ExportError:
        return ExportError(
            f"{self.out_dir}: another export into this directory is running ({holder or 'holder unknown'}, lock {self.path}); "
            "wait for it to finish or export elsewhere"
        )

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is None:
            return
        with _held_lock:
            # Unlink while still holding it: a waiter that opened the old file sees it is gone.
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
            _held.discard(self.path)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def recover(out_dir: Path) -> None:
    """Undo what interrupted exports into ``out_dir`` left; call it holding the :class:`ExportLock`.

    An export killed between the two renames of the fallback switch left the old directory
    aside and none in place: it is put back. Staging directories of killed exports go.
    """
    parent, name = out_dir.parent, out_dir.name
    if not parent.is_dir():
        return
    asides = sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}{ASIDE_MARK}"))
    if asides and not os.path.lexists(out_dir):
        os.rename(asides.pop(), out_dir)
    for p in asides + [p for p in parent.iterdir() if p.name.startswith(f".{name}{STAGE_MARK}")]:
        shutil.rmtree(p, ignore_errors=True)


# ---- the staged output ---------------------------------------------------------------------


class Stage:
    """The next contents of ``out_dir``, built aside (see the module docstring).

    Args:
        out_dir: the output directory (absolute; symlinks already resolved).
        layout: the files and slots, from :func:`~lazysd.export.layout.plan_files`.
        token: unique per export and equal on all of its ranks; names the staging directory.

    Call order: coordinator ``create()``; everyone ``write()``... then ``flush()``;
    coordinator ``commit()`` (or ``abort()`` on any failure, anywhere).
    """

    def __init__(self, out_dir: Path, layout: FileLayout, token: str) -> None:
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.path = stage_path(self.out_dir, token)
        self._fds: dict[str, int] = {}  # shard name -> open descriptor (this process's writes)

    # -- create
    def create(self) -> None:
        """Make the staging directory and every shard file with its header, at its final size.

        Files are sized with ``ftruncate``: unwritten bytes are holes, so creating costs no
        disk space and no time whatever the checkpoint's size.
        """
        try:
            os.mkdir(self.path, 0o777)
        except OSError as e:
            raise io_error("creating the staging directory", self.path, e) from e
        for f in self.layout.files:
            target = self.path / f.name
            try:
                fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    pwrite_all(fd, memoryview(f.header), 0)
                    os.ftruncate(fd, f.size)
                finally:
                    os.close(fd)
            except OSError as e:
                raise io_error(f"creating {f.name}", target, e) from e

    # -- write
    def write(self, key: str, offset: Sequence[int], block: torch.Tensor) -> int:
        """Write ``block`` (a box of tensor ``key`` starting at ``offset``) into its file; returns its bytes.

        ``block`` has the slot's dtype and is contiguous; it may live on any device (it is
        copied to the CPU here, whole: callers bound its size). The box becomes as few
        ``pwrite`` s as its row-major byte runs allow: one for whole trailing dimensions.
        """
        slot = self.layout.slots.get(key)
        if slot is None:
            raise ExportError(f"{key[:200]!r}: not a tensor of this export's layout")
        if block.dtype != slot.dtype:
            raise ExportError(f"{key[:200]!r}: block of dtype {block.dtype}, the file holds {slot.dtype}")
        if len(offset) != len(slot.shape) or block.dim() != len(slot.shape) or any(
            o < 0 or o + n > s for o, n, s in zip(offset, block.shape, slot.shape)
        ):
            raise ExportError(f"{key[:200]!r}: a block of shape {list(block.shape)} at {list(offset)} is not inside its shape {list(slot.shape)}")
        if block.device.type != "cpu":
            block = block.cpu()
        fd = self._fd(slot)
        data = memoryview(block.reshape(-1).view(torch.uint8).numpy())
        box = [(int(o), int(o) + n) for o, n in zip(offset, block.shape)]
        done = 0
        try:
            for pos, n in byte_runs(slot.shape, slot.dtype.itemsize, box):
                pwrite_all(fd, data[done : done + n], slot.offset + pos)
                done += n
        except OSError as e:
            raise io_error(f"writing {key[:200]!r} to {slot.file}", self.path / slot.file, e) from e
        return done

    def _fd(self, slot: TensorSlot) -> int:
        fd = self._fds.get(slot.file)
        if fd is None:
            if len(self._fds) >= 32:  # bound open descriptors: flush the oldest file's
                self._close(next(iter(self._fds)))
            try:
                fd = self._fds[slot.file] = os.open(self.path / slot.file, os.O_RDWR)
            except OSError as e:
                raise io_error(f"opening {slot.file}", self.path / slot.file, e) from e
        return fd

    def _close(self, name: str) -> None:
        fd = self._fds.pop(name)
        try:
            os.fsync(fd)  # write errors (NFS, full disks) may only surface here
        except OSError as e:
            raise io_error(f"writing {name}", self.path / name, e) from e
        finally:
            os.close(fd)

    def flush(self) -> None:
        """Fsync and close every file this process wrote to."""
        while self._fds:
            self._close(next(iter(self._fds)))

    # -- commit / abort
    def commit(self, *, config: bytes | None = None, overwrite: bool = False) -> Path:
        """Write index and config.json into the stage, then put the stage in place of ``out_dir``.

        Args:
            config: bytes of config.json to write, or None to keep (on overwrite) the output
                directory's own.
            overwrite: replace a non-empty ``out_dir``, keeping its other files; without it a
                non-empty ``out_dir`` (another export committed first) is an error.

        Raises:
            ExportError: ``out_dir`` is not empty and ``overwrite`` is False, or an OS
                failure (the output directory is then unchanged).
        """
        self.flush()
        try:
            _write_synced(self.path / INDEX_NAME, (json.dumps(self.layout.index(), indent=2) + "\n").encode())
            if config is not None:
                _write_synced(self.path / CONFIG_NAME, config)
        except OSError as e:
            raise io_error("writing the index", self.path, e) from e
        old = _entries(self.out_dir)
        if old:
            if not overwrite:
                raise ExportError(f"{self.out_dir}: another export wrote this directory meanwhile; nothing was changed")
            self._carry(old, new_config=config is not None)
        try:
            _fsync_dir(self.path)
            leftover = _switch(self.path, self.out_dir, replace=bool(old))
        except FileExistsError:
            raise ExportError(f"{self.out_dir}: another export created this directory meanwhile; nothing was changed") from None
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                raise ExportError(f"{self.out_dir}: another export created this directory meanwhile; nothing was changed") from None
            raise io_error("putting the export in place", self.out_dir, e) from e
        if leftover is not None:
            shutil.rmtree(leftover, ignore_errors=True)
        _fsync_dir(self.out_dir.parent)
        return self.out_dir

    def _carry(self, old: list[str], *, new_config: bool) -> None:
        """Hard-link (or copy) the files that stay over from ``out_dir`` into the stage."""
        for name in old:
            if _replaced(name, new_config=new_config):
                continue
            src, dst = self.out_dir / name, self.path / name
            try:
                if src.is_dir() and not src.is_symlink():
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(src), str(dst))
            except OSError as e:
                raise io_error(f"carrying {name} over", src, e) from e
        shutil.copymode(self.out_dir, self.path)

    def close(self) -> None:
        """Close this process's files without syncing them (a failed export's other ranks)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        """Close this process's files and remove the staging directory (coordinator). Idempotent."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _replaced(name: str, *, new_config: bool) -> bool:
    """Whether a file of the old output directory is superseded by the new export."""
    if name.endswith(".safetensors") or name == INDEX_NAME or (new_config and name == CONFIG_NAME):
        return True
    return name.startswith(".") and _LEGACY_TMP in name  # a killed export's temporary (older lazysd)


def _entries(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise ExportError(f"{path}: exists and is not a directory") from None


def _link_or_copy(src: str, dst: str) -> str:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return dst
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


# ---- the atomic switch ---------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _exchange_entries(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically; False where the system or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_aside(out_dir: Path, aside: Path) -> None:
    os.rename(out_dir, aside)


def _switch(stage: Path, out_dir: Path, *, replace: bool) -> Path | None:
    """Put ``stage`` where ``out_dir`` is; returns where the old contents went (to delete), if anywhere.

    ``replace`` False: ``out_dir`` is absent or empty, and one ``rename`` puts the stage in
    its place; it fails if another export filled ``out_dir`` meanwhile.
    """
    if not replace:
        os.rename(stage, out_dir)
        return None
    if _exchange_entries(stage, out_dir):
        return stage
    aside = out_dir.parent / (f".{out_dir.name}{ASIDE_MARK}" + stage.name.rpartition(STAGE_MARK)[2])
    _rename_aside(out_dir, aside)
    os.rename(stage, out_dir)  # an interruption right before this is undone by recover()
    return aside
