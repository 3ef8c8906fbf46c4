"""Where a local checkpoint is: the path forms users pass, resolved to one directory.

Accepted forms, all local (nothing is downloaded):

* a checkpoint directory, with ``~`` expanded;
* a ``model.safetensors`` file of a single-file checkpoint (its directory is used);
* a Hugging Face hub cache repository root ``.../models--org--name`` (the snapshot that
  ``refs/main``, or ``revision=``, points to);
* a hub repo id ``org/name`` that is not a local path: looked up in the local Hugging Face
  cache, with the cache layout and environment variables of ``huggingface_hub``
  (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``).

Example:
    >>> resolve_checkpoint_path("Qwen/Qwen3-30B-A3B")                     # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--Qwen--Qwen3-30B-A3B/snapshots/ad44e...')
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from .errors import CheckpointNotFoundError

# A hub id: "name" or "org/name", of the characters the hub allows.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
INDEX_NAME = "model.safetensors.index.json"


def hf_cache_dir() -> Path:
    """The local hub cache, found as ``huggingface_hub`` finds it.

    ``HF_HUB_CACHE``, else the older ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def kind_of(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file, in words (None for a regular file).

    Follows symlinks; says so for a loop or a dangling link.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a dangling symlink" if os.path.islink(path) else "missing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def resolve_checkpoint_path(path: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """The local checkpoint directory ``path`` stands for (absolute, not symlink-resolved).

    Args:
        path: a directory, a ``model.safetensors`` file, a hub cache repository root
            (``models--org--name``) or a hub repo id (``org/name``) in the local cache.
        revision: with a hub cache repository or repo id: a branch or tag name (looked up
            in ``refs/``) or a commit hash (a ``snapshots/`` folder). Default ``main``.

    Raises:
        CheckpointNotFoundError: nothing usable there; the message says what was looked at.
    """
    text = os.fspath(path)
    given = Path(text).expanduser()
    if given.is_dir():
        if _is_repo_root(given):
            return _snapshot(given, revision)
        _no_revision(given, revision)
        return given.absolute()
    if given.exists() or given.is_symlink():
        if given.is_file() and given.suffix == ".safetensors":
            return _single_file(given.absolute(), revision)
        what = kind_of(given) or "a file, not a checkpoint directory"
        raise CheckpointNotFoundError(f"{given.absolute()}: is {what}; pass a checkpoint directory")
    if not given.is_absolute() and not text.startswith((".", "~")) and _REPO_ID.fullmatch(text):
        repo = hf_cache_dir() / ("models--" + text.replace("/", "--"))
        if repo.is_dir():
            return _snapshot(repo, revision)
        raise CheckpointNotFoundError(
            f"{text}: not a local directory, and not in the local Hugging Face cache ({repo} does not exist). "
            "lazysd resolves hub ids from the local cache only and downloads nothing: download it first "
            f"(e.g. `huggingface-cli download {text}`), or pass a directory"
        )
    raise CheckpointNotFoundError(f"{given.absolute()}: checkpoint directory does not exist")


def _no_revision(where: Path, revision: str | None) -> None:
    if revision is not None:
        raise CheckpointNotFoundError(f"{where}: revision={revision!r} applies only to a Hugging Face cache repository or hub id")


def _is_repo_root(path: Path) -> bool:
    """A hub cache repository folder: ``models--org--name`` holding ``snapshots/``."""
    return path.name.startswith(("models--", "datasets--")) and (path / "snapshots").is_dir()


def _snapshot(repo: Path, revision: str | None) -> Path:
    """The snapshot folder of a hub cache repository for ``revision`` (default ``main``)."""
    snapshots = repo / "snapshots"
    rev = revision or "main"
    ref = repo / "refs" / rev
    if ref.is_file():
        commit = ref.read_text(errors="replace").strip()
        target = snapshots / commit
        if not _COMMIT.fullmatch(commit) or not target.is_dir():
            raise CheckpointNotFoundError(f"{ref}: points to commit {commit[:60]!r}, which has no folder in {snapshots}")
        return target.absolute()
    if _COMMIT.fullmatch(rev) and (snapshots / rev).is_dir():
        return (snapshots / rev).absolute()
    have = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    refs = sorted(p.name for p in (repo / "refs").iterdir()) if (repo / "refs").is_dir() else []
    if revision is None and len(have) == 1:
        return (snapshots / have[0]).absolute()  # one snapshot and no refs/main: no choice to make
    raise CheckpointNotFoundError(
        f"{repo}: no snapshot for revision {rev!r} (refs: {', '.join(refs) or 'none'}; snapshots: "
        f"{', '.join(have[:8]) or 'none'}{' ...' if len(have) > 8 else ''}); pass revision= a ref or commit, "
        "or the snapshots/<commit> folder itself"
    )


def _single_file(file: Path, revision: str | None) -> Path:
    """The directory of a single-file checkpoint, or an error naming the folder to pass."""
    _no_revision(file, revision)
    folder = file.parent
    if file.name == "model.safetensors" and not (folder / INDEX_NAME).exists():
        return folder
    raise CheckpointNotFoundError(
        f"{file}: is one weights file; lazysd opens a checkpoint by its folder (config.json, index and "
        f"all shards): pass {folder}"
    )
