"""Shared-memory primitives of node sharing (:mod:`lazysd.nodeshare`): a node directory
per job and checkpoint, claims, and published boxes' bytes.

* :class:`Membership`: this process's place in a node directory (a shared ``flock`` on its
  ``members`` file, held while the VirtualStateDict is open); the last member out removes
  the directory, and :func:`sweep` removes those whose members all died.
* :func:`claim` / :func:`drop_claim` / :func:`await_claim`: who reads a box. A claim is a
  file locked before it appears, so a held claim is always locked and a dead claimant's
  lock is dropped by the kernel.
* :func:`read_exact` / :func:`write_exact`: a published box's bytes, into and out of tensors.

Everything lives under :func:`shm_root` (``$LAZYSD_SHM_DIR``, else ``/dev/shm``), in
directories named ``lazysd-node-<32 hex digits>``: nothing else is ever removed.

Example:
    >>> fd = claim(os.path.join(where, "box"))     # doctest: +SKIP
    >>> drop_claim(os.path.join(where, "box"), fd)  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import socket
import threading
import time
import weakref

import torch

STALE_SECONDS = 60.0  # a directory without a members file this old was left by a crash
_PREFIX = "lazysd-node-"
_NAME = re.compile(_PREFIX + "[0-9a-f]{32}")  # only these are ever swept


def shm_root() -> str:
    """Where node-shared boxes live: ``$LAZYSD_SHM_DIR``, else ``/dev/shm``."""
    return os.environ.get("LAZYSD_SHM_DIR", "/dev/shm")


class Membership:
    """This process's place in a node directory: a shared lock on its ``members`` file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dir: str | None = None
        self.fd: int | None = None
        self.failed = False
        _MEMBERSHIPS.add(self)

    def _after_fork(self) -> None:
        """In a child made by ``os.fork``: the descriptor shares the parent's lock, which only
        the parent may drop (an unlock here would drop it for both). Forget it; no sharing."""
        self.lock = threading.Lock()
        if self.fd is not None:
            os.close(self.fd)  # closing one copy keeps the lock: the parent's copy holds it
        self.dir, self.fd, self.failed = None, None, True

    def join(self, job: str, identity: str) -> str | None:
        """The node directory of this job and checkpoint (joined on first use); None if unusable."""
        if self.dir is not None or self.failed:
            return self.dir
        with self.lock:
            if self.dir is None and not self.failed:
                root = shm_root()
                name = _PREFIX + hashlib.sha256(f"{job}\0{identity}".encode()).hexdigest()[:32]
                try:
                    sweep(root, keep=name)
                    self.dir, self.fd = _enter(os.path.join(root, name))
                except OSError:
                    self.failed = True  # no usable shared memory: every rank reads for itself
        return self.dir

    def leave(self) -> None:
        with self.lock:
            if self.dir is not None and self.fd is not None:
                _leave(self.dir, self.fd)
            self.dir = self.fd = None


_MEMBERSHIPS: weakref.WeakSet[Membership] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for membership in list(_MEMBERSHIPS):
        membership._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _enter(where: str) -> tuple[str, int]:
    """Join (creating it if needed) the directory ``where``: a shared lock on its members file."""
    for _ in range(100):
        try:
            os.mkdir(where, 0o700)
        except FileExistsError:
            pass
        members = os.path.join(where, "members")
        try:
            fd = os.open(members, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
        except FileNotFoundError:
            continue  # removed by its last member just now: make it again
        if _lock_within(fd, fcntl.LOCK_SH, 10.0):
            try:
                if os.stat(members).st_ino == os.fstat(fd).st_ino:
                    return where, fd
            except FileNotFoundError:
                pass
        os.close(fd)  # the directory was removed while we joined it: again
    raise OSError(errno.EAGAIN, f"{where}: could not join the node's shared directory")


def _leave(where: str, fd: int) -> None:
    """Drop this member's lock; if no member is left, remove the directory and its boxes."""
    fcntl.flock(fd, fcntl.LOCK_UN)  # first, so two leaving at once cannot both see the other
    try:
        if _lock_within(fd, fcntl.LOCK_EX, 0.0):
            shutil.rmtree(where, ignore_errors=True)
    finally:
        os.close(fd)


def sweep(root: str, *, keep: str | None = None) -> list[str]:
    """Remove node directories under ``root`` that no live process holds (all its ranks died).

    Returns the names removed. A directory being made right now is left alone (its maker
    holds it, or it is younger than a minute).
    """
    removed = []
    try:
        names = [n for n in os.listdir(root) if _NAME.fullmatch(n) and n != keep]
    except OSError:
        return removed
    for n in names:
        where = os.path.join(root, n)
        try:
            fd = os.open(os.path.join(where, "members"), os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            try:
                if time.time() - os.stat(where).st_mtime > STALE_SECONDS:
                    shutil.rmtree(where, ignore_errors=True)
                    removed.append(n)
            except OSError:
                pass
            continue
        except OSError:
            continue
        try:
            if _lock_within(fd, fcntl.LOCK_EX, 0.0):
                shutil.rmtree(where, ignore_errors=True)
                removed.append(n)
        finally:
            os.close(fd)
    return removed


# ---- claims ---------------------------------------------------------------------------------
def claim(name: str) -> int | None:
    """Claim the box ``name`` for reading: a file descriptor holding the claim's lock, or
    None if another rank holds the claim (OSError if no claim can be made here). The lock is
    taken before the claim file appears (made under a private name, then hard-linked), so a
    held claim is always locked."""
    tmp = f"{name}.{os.getpid()}.{threading.get_ident()}.c"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.link(tmp, name + ".claim")
    except FileExistsError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    finally:
        unlink(tmp)
    return fd


def drop_claim(name: str, fd: int) -> None:
    try:
        if os.stat(name + ".claim").st_ino == os.fstat(fd).st_ino:
            unlink(name + ".claim")
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def await_claim(name: str, deadline: float) -> bool:
    """Wait until the claim on ``name`` goes (published, failed or its rank died): True;
    False when ``deadline`` passes first."""
    claim = name + ".claim"
    try:
        fd = os.open(claim, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return True
    try:
        if not _lock_within(fd, fcntl.LOCK_SH, max(0.0, deadline - time.monotonic())):
            return False
        # The claimant let go. Published, or gave up (its error is its own): try again. A
        # claim file still there with no lock on it is a dead rank's: remove it (if it is
        # still the same file) so that the box can be claimed again.
        if not os.path.exists(name):
            try:
                if os.stat(claim).st_ino == os.fstat(fd).st_ino:
                    unlink(claim)
            except FileNotFoundError:
                pass
        return True
    finally:
        os.close(fd)


def _lock_within(fd: int, kind: int, seconds: float) -> bool:
    """``flock(fd, kind)`` within ``seconds`` (polled: a blocking flock cannot time out)."""
    deadline = time.monotonic() + seconds
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)


# ---- bytes in and out -------------------------------------------------------------------------
def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")


def read_exact(fd: int, dest: torch.Tensor, offset: int) -> None:
    """The published values into ``dest`` (any device, layout): straight in when it is contiguous CPU memory."""
    direct = dest.device.type == "cpu" and dest.is_contiguous()
    buf = dest if direct else torch.empty(dest.shape, dtype=dest.dtype)
    if buf.numel():
        view = _byte_view(buf)
        pos = 0
        while pos < len(view):
            got = os.preadv(fd, [view[pos:]], offset + pos)
            if got <= 0:
                raise OSError(errno.EIO, "a published box ended early")
            pos += got
    if not direct:
        dest.copy_(buf)


def write_exact(fd: int, src: torch.Tensor, offset: int) -> None:
    if src.device.type != "cpu" or not src.is_contiguous():
        src = src.detach().to("cpu", memory_format=torch.contiguous_format)
    if not src.numel():
        return
    view = _byte_view(src)
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], offset + pos)


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---- identities ------------------------------------------------------------------------------
def node_name() -> str:
    """Same on processes that share ``/dev/shm``, different otherwise (containers included)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        st = os.stat(shm_root())
        mount = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        mount = "-"
    return f"{socket.gethostname()}|{boot}|{mount}"
