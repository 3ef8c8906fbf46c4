"""Safetensors checkpoints: the index, the files' headers, and exact byte-range reads.

This is the only module that opens checkpoint files. Opening a :class:`Checkpoint` reads
``config.json``, ``model.safetensors.index.json`` and each file's header, validates them, and
keeps one descriptor per file; tensor bytes are read later, on request, with ``pread`` into
caller-provided memory. Nothing is memory-mapped, so a file truncated under a running load
gives a :class:`~lazysd.errors.FileChangedError` instead of a SIGBUS.

Example:
    >>> ckpt = Checkpoint("/path/to/Step-3.5-Flash")            # doctest: +SKIP
    >>> ckpt.tensors["model.embed_tokens.weight"].shape          # doctest: +SKIP
    (128815, 4096)
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import stat
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import (
    CheckpointIndexError,
    CheckpointNotFoundError,
    ConfigError,
    FileChangedError,
    HeaderError,
    LazySDError,
    NoWeightsError,
    TooManyFilesError,
    UnsafePathError,
    cut,
    repr_cut,
    shortened,
)
from .header import DTYPES, TensorInfo, parse_header
from .paths import kind_of, resolve_checkpoint_path
from .pread import BouncePool, RangeReader, gather_groups, read_gathered

__all__ = ["DTYPES", "INDEX_NAME", "SINGLE_NAME", "Checkpoint", "TensorInfo", "config_value"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# config.json and the index are a few MB at most; a larger one is refused before it is read.
MAX_JSON_BYTES = 64 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class _FileIdentity:
    """What a file looked like when its header was read; checked before every read."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    # Any write or metadata change sets ctime to "now", and no user call can set it back:
    # the signal that catches a same-size rewrite whose mtime was restored (cp -p, rsync -t).
    ctime_ns: int


class Checkpoint:
    """A checkpoint directory: config, tensor locations, and exact reads.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` or sharded
            ``*.safetensors`` files with ``model.safetensors.index.json``; or any form
            :func:`lazysd.paths.resolve_checkpoint_path` accepts (``~``, a single
            ``model.safetensors`` file, a Hugging Face cache repository or repo id).
        revision: branch, tag or commit of a Hugging Face cache repository (default main).
        config_required: False when the caller does not need config.json to choose the
            model family (an adapter was given): a missing one then reads as ``{}``.

    Attributes:
        config: the parsed config.json.
        tensors: HF key -> :class:`TensorInfo`, in the order keys appear in the files.
        bytes_read: tensor bytes read so far through this object (headers not counted).
    """

    local = True  # files on this machine (descriptors, mmap); see lazysd.storage for remote ones

    def __init__(
        self, path: str | os.PathLike[str], *, revision: str | None = None, config_required: bool = True
    ) -> None:
        self.path = resolve_checkpoint_path(path, revision=revision)
        self.config = self._read_config(config_required)
        self.metadata: dict[str, dict[str, str]] = {}
        self._fds: dict[Path, int] = {}
        self._identity: dict[Path, _FileIdentity] = {}
        self._lock = threading.Lock()
        _CHECKPOINTS.add(self)
        self._mappings: dict[Path, mmap.mmap] = {}  # only with mmap=True; tensors keep them alive
        # Bulk reads of cold bytes with O_DIRECT (lazysd.pread); False: plain pread only.
        self.direct = True
        self._readers: dict[Path, RangeReader] = {}
        self._bounce = BouncePool()
        self.bytes_read = 0
        self.read_calls = 0
        self.header_bytes = 0
        # Descriptors are closed when the object goes away, even without close().
        self._finalizer = weakref.finalize(self, _close_fds, self._fds, self._readers)
        try:
            self.tensors = self._read_tensors()
        except BaseException:
            self.close()
            raise

    # ---- opening -------------------------------------------------------------------------
    def _read_config(self, required: bool) -> dict[str, Any]:
        file = self.path / "config.json"
        what = self._kind(file)
        if what == "missing" and not required:
            return {}
        if what == "missing":
            raise CheckpointNotFoundError(
                f"{file}: config.json not found (lazysd needs it to choose the model family; pass adapter= to name the "
                "family instead)"
            )
        if what is not None:
            raise ConfigError(f"{file}: is {what}, not a regular file")
        raw = self._read_small(file, ConfigError)
        try:
            config = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ConfigError(f"{file}: not valid JSON ({str(e)[:200]})") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{file}: must hold a JSON object, got {type(config).__name__}")
        return config

    def _roots(self) -> tuple[Path, ...]:
        """Directories checkpoint files may resolve into (through symlinks).

        The checkpoint directory itself, and for a Hugging Face hub cache snapshot
        (``models--org--name/snapshots/<rev>``, whose files are symlinks) the repository's
        ``blobs`` directory next to ``snapshots``.
        """
        real = self.path.resolve()
        if real.parent.name == "snapshots":
            return real, real.parent.parent / "blobs"
        return (real,)

    def _check_inside(self, file: Path, where: str) -> None:
        """Refuse a file whose real path (symlinks followed) leaves the checkpoint directory."""
        try:
            real = file.resolve(strict=False)
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
            raise CheckpointNotFoundError(f"{where}: {file.name!r} is a symlink loop") from None
        if not any(real.is_relative_to(root) for root in self._roots()):
            raise UnsafePathError(
                f"{where}: {file.name!r} resolves to {real}, outside the checkpoint directory {self.path} (symlink "
                "leading out?)"
            )

    def _read_small(self, file: Path, error: type[LazySDError]) -> bytes:
        """Bytes of config.json or the index, size-capped, refused if it resolves outside."""
        self._check_inside(file, str(file))
        size = file.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{file}: {size} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file of a checkpoint")
        return file.read_bytes()

    def _resolve_inside(self, name: str, where: str) -> Path:
        """A file named by the index, refused unless it stays inside the checkpoint directory."""
        if not name or "\x00" in name:
            raise UnsafePathError(f"{where}: file name {name!r} is not a plain file name")
        candidate = Path(name)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise UnsafePathError(f"{where}: file {name!r} points outside the checkpoint directory {self.path}")
        full = self.path / candidate
        if self._kind(full) == "a symlink loop":
            return full  # leads nowhere, so not outside either: reported with what it is, never opened
        self._check_inside(full, where)
        return full

    def _weight_files(self) -> tuple[list[Path], dict[str, Path] | None]:
        """The weight files, and key -> file where an index names them."""
        index = self.path / INDEX_NAME
        index_kind = self._kind(index)
        if index_kind not in (None, "missing"):
            # Not silently skipped: the directory would then be read as whatever shards it holds.
            raise CheckpointIndexError(f"{index}: is {index_kind}, not a regular file")
        if index_kind is None:
            resolved = self._resolve_weight_map(index, self._read_weight_map(index))
            files = sorted(set(resolved.values()))
            self._check_shard_series(index, files, indexed=True)
            return files, resolved
        return self._unindexed_files(), None

    def _read_weight_map(self, index: Path) -> dict[str, str]:
        """The index's ``weight_map``, checked: an object of keys to safetensors file names, each key once."""
        twice: dict[str, list[Any]] = {}

        def keep_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            # A key listed twice in one JSON object would silently keep the last file.
            out: dict[str, Any] = {}
            for k, v in pairs:
                if k in out:
                    twice.setdefault(k, [out[k]]).append(v)
                out[k] = v
            return out

        raw = self._read_small(index, CheckpointIndexError)
        try:
            data = json.loads(raw.decode("utf-8"), object_pairs_hook=keep_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointIndexError(f"{index}: not valid JSON ({str(e)[:200]})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointIndexError(f"{index}: expected an object with a 'weight_map' object")
        if not weight_map:
            raise CheckpointIndexError(f"{index}: weight_map is empty (it must name every tensor of the checkpoint)")
        repeated = {k: v for k, v in twice.items() if k in weight_map and weight_map[k] == v[-1]}
        if repeated:
            lines = [f"  {k}: {', '.join(repr_cut(f) for f in v)}" for k, v in list(repeated.items())[:20]]
            raise CheckpointIndexError(
                f"{index}: weight_map lists keys more than once:\n" + "\n".join(lines) + _more(len(repeated), 20)
            )
        not_names = [f"  {k}: {repr_cut(v)}" for k, v in weight_map.items() if not isinstance(v, str)]
        if not_names:
            raise CheckpointIndexError(
                f"{index}: weight_map values must be file names (strings), got:\n"
                + "\n".join(not_names[:20])
                + _more(len(not_names), 20)
            )
        pickle_names = {v for v in set(weight_map.values()) if Path(v).suffix in PICKLE_SUFFIXES}
        pickled = [f"  {k}: {v}" for k, v in weight_map.items() if v in pickle_names]
        if pickled:
            raise NoWeightsError(
                f"{index}: names pickled weight files, which lazysd never unpickles (unpickling can run "
                "arbitrary code):\n" + "\n".join(pickled[:20]) + _more(len(pickled), 20)
            )
        return weight_map

    def _resolve_weight_map(self, index: Path, weight_map: dict[str, str]) -> dict[str, Path]:
        """Key -> file, every file inside the checkpoint and a regular file that exists."""
        resolved: dict[str, Path] = {}
        missing: dict[str, list[str]] = {}
        odd: dict[str, str] = {}  # name -> what it is instead of a regular file
        checked: dict[str, tuple[Path, bool]] = {}  # a shard is named by hundreds of keys: check it once
        for key, name in weight_map.items():
            found = checked.get(name)
            if found is None:
                file = self._resolve_inside(name, f"{index}, key {repr_cut(key)}")
                what = self._kind(file)
                if what not in (None, "missing"):
                    odd[name] = what
                found = checked[name] = (file, name in odd or self._is_file(file))
            file, exists = found
            if not exists:
                missing.setdefault(str(name), []).append(cut(key))
            resolved[key] = file
        if odd:
            lines = [f"  {repr_cut(name)}: {what}" for name, what in sorted(odd.items())[:20]]
            raise CheckpointIndexError(
                f"{index}: names paths that are not regular weights files:\n" + "\n".join(lines) + _more(len(odd), 20)
            )
        if missing:
            lines = [f"  {cut(name)}: {', '.join(shortened(keys))}" for name, keys in sorted(missing.items())[:20]]
            raise CheckpointNotFoundError(
                f"{index}: names files that do not exist, for these keys:\n"
                + "\n".join(lines)
                + _more(len(missing), 20)
            )
        return resolved

    def _unindexed_files(self) -> list[Path]:
        """Without an index: ``model.safetensors``, else one complete numbered series of shards."""
        single = self.path / SINGLE_NAME
        if self._is_file(single):
            return [single]
        shards = sorted(p for p in self._listing() if p.suffix == ".safetensors" and not p.name.startswith("."))
        odd = [(p.name, what) for p in shards if (what := self._kind(p)) is not None]
        if odd:
            lines = [f"  {repr_cut(name)}: {what}" for name, what in odd[:20]]
            raise CheckpointNotFoundError(
                f"{self.path}: weights names that are not regular files:\n" + "\n".join(lines) + _more(len(odd), 20)
            )
        if shards:
            # Without an index the file names are all there is to go by: a numbered series
            # must be complete, and be the only one (two series are two checkpoints mixed).
            self._check_shard_series(self.path, shards, indexed=False)
            return shards
        pickles = sorted(p.name for p in self._listing() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise NoWeightsError(
                f"{self.path}: only pickled weights found ({', '.join(shortened(pickles))}); lazysd never unpickles "
                "checkpoint files because unpickling can run arbitrary code. Convert them to safetensors first."
            )
        raise NoWeightsError(f"{self.path}: no model.safetensors, {INDEX_NAME} or *.safetensors files found")

    # Where a checkpoint's files are found: overridden for remote storage (lazysd.storage).
    def _kind(self, file: Path) -> str | None:
        """None for a regular file, else what it is ("missing", "a directory", ...)."""
        return kind_of(file)

    def _is_file(self, file: Path) -> bool:
        return file.is_file()

    def _listing(self) -> list[Path]:
        return list(self.path.iterdir())

    def _check_shard_series(self, where: Path, files: list[Path], *, indexed: bool) -> None:
        """Every shard of a ``name-0000i-of-0000N.safetensors`` series in use is there.

        With an index: every shard of a series the index uses is named by it (an index that
        lost every key of one shard, half-copied or hand-edited, would otherwise load
        without that shard's tensors, silently). Without one: every shard of the series is
        in the directory, and the directory holds one series only.
        """
        series: dict[tuple[str, str], set[int]] = {}  # (stem, total as written) -> shard numbers
        for file in files:
            m = _SHARD_NAME.fullmatch(file.name)
            if m is not None:
                series.setdefault((m["stem"], m["total"]), set()).add(int(m["i"]))
        for (stem, written), named in sorted(series.items()):
            total, width = int(written), len(written)  # names as the series writes them
            # Bounded by the shards present, never by the total a file name claims.
            absent = len(set(range(1, total + 1)) - named) if total <= len(named) + 1000 else total - len(named)
            if absent or any(i < 1 or i > total for i in named):
                unnamed = (
                    f"{stem}-{i:0{width}d}-of-{total:0{width}d}.safetensors"
                    for i in range(1, total + 1)
                    if i not in named
                )
                shown = [next(unnamed) for _ in range(min(absent, 8))] + (
                    [f"... {absent - 8} more"] if absent > 8 else []
                )
                beyond = sorted(i for i in named if i < 1 or i > total)
                problem = (
                    f"shard number(s) {', '.join(map(str, beyond[:8]))} outside 1..{total}"
                    if beyond
                    else ("no key in " if indexed else "missing: ") + ", ".join(shown)
                )
                if indexed:
                    raise CheckpointIndexError(
                        f"{where}: names shards {cut(stem)}-*-of-{total:0{width}d}.safetensors but {problem}"
                        + ("" if beyond else " (a shard's keys are missing from the index)")
                    )
                raise CheckpointNotFoundError(
                    f"{where}: has shards {cut(stem)}-*-of-{total:0{width}d}.safetensors and no {INDEX_NAME}; "
                    f"the series is incomplete, {problem} (a half-copied or half-downloaded checkpoint?)"
                )
        if not indexed and len(series) > 1:
            names = [f"{cut(stem)}-*-of-{written}.safetensors" for stem, written in sorted(series)]
            raise CheckpointNotFoundError(
                f"{where}: holds {len(series)} shard series ({', '.join(names[:4])}) and no {INDEX_NAME}, "
                "so which files form the checkpoint is unknown (leftovers of an earlier checkpoint?); remove the stale "
                "ones"
            )

    def _read_tensors(self) -> dict[str, TensorInfo]:
        files, weight_map = self._weight_files()
        tensors: dict[str, TensorInfo] = {}
        duplicates: dict[str, list[str]] = {}
        for file in files:
            found = self._open(file)
            for key, info in found.items():
                if key in tensors:
                    duplicates.setdefault(key, [tensors[key].file.name]).append(file.name)
                    continue
                tensors[key] = info
        if duplicates:
            lines = [f"  {k}: in {', '.join(v)}" for k, v in list(duplicates.items())[:20]]
            raise CheckpointIndexError(
                f"{self.path}: keys stored in more than one file:\n" + "\n".join(lines) + _more(len(duplicates), 20)
            )
        if weight_map is not None:
            index = self.path / INDEX_NAME
            lacking = [
                f"  {k}: index says {f.name}, which lacks it"
                for k, f in weight_map.items()
                if k not in tensors or tensors[k].file != f
            ]
            unlisted = [
                f"  {k}: in {t.file.name} but not in the index" for k, t in tensors.items() if k not in weight_map
            ]
            if lacking or unlisted:
                problems = lacking + unlisted
                raise CheckpointIndexError(
                    f"{index}: disagrees with the files:\n" + "\n".join(problems[:20]) + _more(len(problems), 20)
                )
            # Keep the index's key order: it is how the checkpoint's author listed them.
            tensors = {k: tensors[k] for k in weight_map}
        return tensors

    def _open(self, file: Path) -> dict[str, TensorInfo]:
        self._check_inside(file, str(file))
        try:
            # O_NONBLOCK: opening a FIFO planted under a weights name must not wait for a writer
            # (it has no effect on the regular files that pass the check below).
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{file}: weights file does not exist") from None
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise _too_many_files(file, len(self._fds), e) from None
            raise
        self._fds[file] = fd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError(f"{file}: not a regular file")
        self._identity[file] = _FileIdentity(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        # Reads are exact ranges; kernel readahead would pull in other ranks' experts.
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        tensors, metadata = parse_header(file, fd, st.st_size)
        self.metadata[file.name] = metadata
        self.header_bytes += 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
        return tensors

    # ---- reading -------------------------------------------------------------------------
    def _changed(self, file: Path, st: os.stat_result) -> bool:
        expected = self._identity[file]
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (expected.size, expected.mtime_ns, expected.ctime_ns)

    def file_identities(self) -> dict[Path, Any]:
        """Each opened weights file's identity, what a change of the file alters (device,
        inode, size, mtime and ctime here; size and ETag for remote objects)."""
        return dict(self._identity)

    def check_unchanged(self, file: Path) -> int:
        """Raise :class:`FileChangedError` if ``file`` changed since it was opened; return its fd."""
        fd = self._fds.get(file)
        if fd is None:
            raise FileChangedError(f"{file}: checkpoint was closed")
        expected = self._identity[file]
        # The name first: a file deleted or replaced also changes the old inode's ctime
        # (its link count), and "replaced" is the more useful thing to say.
        try:
            now = os.stat(file)
        except FileNotFoundError:
            raise FileChangedError(f"{file}: was deleted or renamed since the checkpoint was opened") from None
        if (now.st_dev, now.st_ino) != (expected.dev, expected.ino):
            raise FileChangedError(
                f"{file}: was replaced by another file since the checkpoint was opened; reopen the checkpoint"
            )
        # The same inode as the descriptor's: its stat is the descriptor's (no fstat needed).
        if self._changed(file, now):
            raise FileChangedError(
                f"{file}: changed since the checkpoint was opened (size {expected.size} -> {now.st_size}, "
                f"mtime {expected.mtime_ns} -> {now.st_mtime_ns}, ctime {expected.ctime_ns} -> {now.st_ctime_ns}); "
                "reopen the checkpoint"
            )
        return fd

    def read_into(self, info: TensorInfo, byte_start: int, out: memoryview) -> None:
        """Read ``len(out)`` bytes of tensor ``info`` starting ``byte_start`` bytes into it."""
        self.read_runs(info, [(byte_start, len(out))], out)

    def read_runs(self, info: TensorInfo, runs: list[tuple[int, int]], out: memoryview) -> None:
        """Read byte ranges ``(start, length)`` of a tensor back to back into ``out``."""
        reader = self.range_reader(info.file)

        def read(fd: int) -> int:
            pos = 0
            for group in gather_groups([(info.offset + start, n) for start, n in runs]):
                want = sum(n for _, n in group)
                if len(group) == 1:
                    got = reader.read(out[pos : pos + want], group[0][0])
                else:  # runs a few bytes apart (a column shard's rows): one system call
                    got = read_gathered(fd, out[pos : pos + want], group)
                pos += got
                if got < want:
                    break
            return pos

        self.read_with(info, runs, read)

    def range_reader(self, file: Path) -> RangeReader:
        """The :class:`~lazysd.pread.RangeReader` of an opened weights file (made on first use)."""
        reader = self._readers.get(file)
        if reader is None:
            with self._lock:
                reader = self._readers.get(file)
                if reader is None:
                    reader = self._readers[file] = RangeReader(
                        self.check_unchanged(file), direct=self.direct, pool=self._bounce
                    )
        return reader

    def read_with(self, info: TensorInfo, runs: list[tuple[int, int]], read: Callable[[int], int]) -> None:
        """Have ``read(fd)`` read byte ranges ``(start, length)`` of tensor ``info``
        (:meth:`read_batch` of one); ``read`` returning fewer bytes than the ranges hold
        means the file ended early."""
        if not self.read_batch([(info, runs)], lambda fds: [read(fds[0])])[0]:
            raise FileChangedError(f"{info.file}, key {info.key!r}: file ended early (truncated after it was opened?)")

    def read_batch(
        self, reads: list[tuple[TensorInfo, list[tuple[int, int]]]], run: Callable[[list[int]], list[int]]
    ) -> list[bool]:
        """Have ``run(fds)`` read the byte ranges ``(start, length)`` of each tensor of
        ``reads`` at once, ``fds[i]`` the descriptor of ``reads[i]``'s file; it returns the
        bytes each read. Returns which reads got all their bytes (the caller reads the others
        again its own way, or reports them).

        Every read goes through here, also those that put the bytes somewhere themselves
        (the transposing reads, the batched reads of cached bytes); ``start`` counts from the
        tensor's first byte, at file offset ``info.offset``. The checks and counting of every
        read: the ranges are inside the tensor, each file is the one opened and unchanged
        before and after.
        """
        wanted = []  # bytes of each read
        for info, runs in reads:
            size = info.nbytes
            for start, n in runs:
                if start < 0 or start + n > size:
                    where = f"{info.file}, key {info.key!r}"
                    raise ValueError(f"{where}: byte range {start}+{n} outside the tensor's {size} bytes")
            wanted.append(runs[0][1] if len(runs) == 1 else sum(n for _, n in runs))
        fds = {file: self.check_unchanged(file) for file in dict.fromkeys(info.file for info, _ in reads)}
        got = run([fds[info.file] for info, _ in reads])
        # A write that landed while we read would otherwise go unnoticed: the bytes would be
        # a mix of old and new. One fstat a file is cheap next to a read.
        for file, fd in fds.items():
            if self._changed(file, os.fstat(fd)):
                key = next(info.key for info, _ in reads if info.file == file)
                raise FileChangedError(
                    f"{file}, key {key!r}: file changed while it was being read; reopen the checkpoint"
                )
        done = [g >= n for g, n in zip(got, wanted, strict=True)]
        with self._lock:
            for ok, n, (_, runs) in zip(done, wanted, reads):
                if ok:
                    self.bytes_read += n
                    self.read_calls += len(runs)
        return done

    def mapping(self, file: Path) -> mmap.mmap:
        """A private (copy-on-write) mapping of a whole weights file, made once, checked first."""
        with self._lock:
            mapped = self._mappings.get(file)
            if mapped is None:
                fd = self.check_unchanged(file)
                mapped = self._mappings[file] = mmap.mmap(
                    fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            return mapped

    # ---- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the file descriptors. Further reads raise :class:`FileChangedError`."""
        _close_fds(self._fds, self._readers)
        self._bounce.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("Checkpoint holds open files; pass its path to other processes instead")

    @property
    def files(self) -> list[Path]:
        return list(self._identity)


_CHECKPOINTS: weakref.WeakSet[Checkpoint] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # A child made by os.fork shares the descriptors (pread needs no file position) but not
    # the threads: a lock one of them held at the fork would stay held forever here.
    for ckpt in list(_CHECKPOINTS):
        ckpt._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _too_many_files(file: Path, opened: int, e: OSError) -> LazySDError:
    """The open-file limit reached while opening shards: name the limit and the fix."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = f"RLIMIT_NOFILE is {soft} (hard limit {hard})"
    except (ImportError, OSError, ValueError):
        limit = "the open-file limit is reached"
    return TooManyFilesError(
        f"{file}: cannot open another weights file ({e.strerror}) after {opened} of this checkpoint: {limit}. "
        "lazysd keeps one descriptor per shard while a checkpoint is open; raise the limit (`ulimit -n`, or "
        "resource.setrlimit(resource.RLIMIT_NOFILE, ...)) above the shard count plus what the process already holds"
    )


def _close_fds(fds: dict[Path, int], readers: dict[Path, RangeReader] | None = None) -> None:
    for reader in (readers or {}).values():
        reader.close()
    (readers or {}).clear()
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


_SHARD_NAME = re.compile(r"(?P<stem>.+)-(?P<i>[0-9]+)-of-(?P<total>[0-9]+)\.safetensors")


def _more(total: int, shown: int) -> str:
    return f"\n  ... {total - shown} more" if total > shown else ""


def config_value(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    """First of ``names`` present in config (dotted names reach into nested objects)."""
    for name in names:
        node: Any = config
        for part in name.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return node
    return default
