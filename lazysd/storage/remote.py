"""Remote checkpoints: the same headers, validation and exact byte ranges, over fsspec.

:class:`RemoteCheckpoint` is a :class:`~lazysd.checkpoint.Checkpoint` whose files are objects
behind a URL. Everything a local checkpoint checks (config, index, headers, shard series,
byte ranges inside tensors) is checked by the same code; only where bytes come from differs:

* headers: one ranged GET per file for the 8-byte length *and* the header (the first
  ``RemoteOptions.header_bytes``, speculatively; a second GET only for a larger header),
  ``max_requests`` files' at once. The
  response's ``Content-Range`` gives the object's size and its ``ETag`` its identity, so no
  HEAD request is needed;
* tensor bytes: exactly the planned runs, coalesced under a gap threshold
  (:func:`~lazysd.storage.ranges.coalesce`), issued as concurrent ranged GETs, at most
  ``max_requests`` in flight per checkpoint, each response copied into the caller's memory;
* change detection: every data GET carries ``If-Match: <ETag from the header read>`` (S3 and
  HTTP) or ``ifGenerationMatch=<generation>`` (GCS), so an object replaced during a load
  answers 412 and raises :class:`~lazysd.errors.FileChangedError`; other filesystems compare
  the object's size and ETag before the first data read of each file;
* failures: timeouts, dropped connections, 5xx and throttling are retried with exponential
  backoff, bounded in attempts and seconds; 404 -> :class:`~lazysd.errors.CheckpointNotFoundError`,
  401/403 -> :class:`~lazysd.errors.RemoteAccessError`, naming the URL and the key. URLs are
  shown without credentials or query strings and ``storage_options`` never appear in messages.

Four backends: S3 through s3fs's client (``s3://``), HTTP(S) through fsspec's aiohttp session
(``https://``), GCS's JSON API through gcsfs's session and credentials (``gs://``), and any
other fsspec filesystem through its public ``info``/``open`` (``hf://`` ...).
"""

from __future__ import annotations

import random
import re
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..checkpoint import MAX_JSON_BYTES, Checkpoint
from ..errors import (
    CheckpointNotFoundError,
    FileChangedError,
    LazySDError,
    RemoteAccessError,
    RemoteReadError,
)
from ..header import TensorInfo, header_length, parse_header_bytes
from .backends import Failure, FsspecBackend, Identity, classify_exception, filesystem
from .ranges import RemoteOptions, coalesce
from .urls import scrub_url


@dataclass(frozen=True, order=True)
class RemotePath:
    """A file of a remote checkpoint, as shown to users: the URL without credentials.

    Supports the little of :class:`pathlib.Path` that checkpoint code uses on files
    (``/``, ``name``, ``suffix``, ``str``); it never opens anything itself.
    """

    root: str  # scrubbed URL of the checkpoint directory, no trailing slash
    rel: str = ""  # path below it ("" is the directory itself)

    def __truediv__(self, other: object) -> RemotePath:
        rel = str(other).strip("/")
        return RemotePath(self.root, f"{self.rel}/{rel}" if self.rel else rel)

    @property
    def name(self) -> str:
        return (self.rel or self.root).rstrip("/").rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        i = name.rfind(".")
        return name[i:] if 0 < i < len(name) - 1 else ""

    def __str__(self) -> str:
        return f"{self.root}/{self.rel}" if self.rel else self.root

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"


class RemoteStore:
    """Ranged reads of the objects under one URL, with retries, counting and a request bound."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, options: RemoteOptions) -> None:
        self.url = url
        self.display = scrub_url(url).rstrip("/")
        self.options = options
        self.protocol = url.split("://", 1)[0].lower()
        # Secret values of storage_options, to be blanked from any text lazysd shows.
        self._secrets = sorted(_secret_values(storage_options or {}, url), key=len, reverse=True)
        try:
            self.fs, backend = filesystem(self.protocol, storage_options or {}, options)
        except LazySDError:
            raise
        except Exception as e:
            raise LazySDError(
                f"{self.display}: could not set up the {self.protocol}:// filesystem ({self.scrub(str(e))[:300]})"
            ) from None
        self.backend = backend(self.fs, options)
        try:
            self.root = self._root(url)
        except Exception as e:
            failure = classify_exception(e)
            text = self.scrub(str(e))
            if _status_in_chain(e) in (401, 403):  # e.g. a gated Hub repo, which HfFileSystem calls "not found"
                raise RemoteAccessError(f"{self.display}: access denied; check the token or credentials") from None
            if isinstance(e, FileNotFoundError) or "404" in text or "NotFound" in type(e).__name__:
                raise CheckpointNotFoundError(f"{self.display}: repository or revision not found") from None
            if failure.kind == "denied" or isinstance(e, PermissionError) or re.search(r"\b40[13]\b", text):
                raise RemoteAccessError(f"{self.display}: access denied; check the token or credentials") from None
            raise RemoteReadError(f"{self.display}: could not resolve ({failure.detail}: {text[:200]})") from None
        self._slots = threading.BoundedSemaphore(options.max_requests)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.requests = 0  # GETs issued (retries included)
        self.bytes_requested = 0  # bytes those GETs asked for
        self.retried = 0  # attempts that failed transiently and were retried

    def _root(self, url: str) -> str:
        if self.protocol in ("http", "https"):
            return url.split("?", 1)[0].rstrip("/")
        if self.protocol == "hf":
            return _hf_root(self.fs, url)
        return self.fs._strip_protocol(url).rstrip("/")

    def path_of(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def scrub(self, text: str) -> str:
        """``text`` with URLs' credentials and every secret of storage_options blanked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: scrub_url(m.group(0)), text)

    # ---- listing -------------------------------------------------------------------------
    def listing(self) -> dict[str, int] | None:
        """Names (relative) -> sizes of the files directly under the root, or None if unknown."""
        if not self.backend.lists:
            return None
        try:
            return self.backend.listing(self.root)
        except Exception:
            # Listing may be denied where reading is not (a bucket policy granting GetObject
            # only) or unsupported: the index names the files, so go on without it.
            return None

    # ---- requests ------------------------------------------------------------------------
    def get(self, rel: str, start: int, end: int, etag: str | None, *, where: str) -> tuple[bytes, int, str | None]:
        """One ranged GET of ``[start, end)`` with lazysd's retry policy; errors name ``where``."""
        opts = self.options
        t0 = time.monotonic()
        delay = opts.backoff
        attempt = 0
        path = self.path_of(rel)
        while True:
            with self._slots:
                with self._lock:
                    self.requests += 1
                    self.bytes_requested += end - start
                try:
                    body, total, got_etag = self.backend.get(path, start, end, etag)
                    if total >= 0 and len(body) != max(0, min(end, total) - start):
                        # A body cut short without a transport error: a dropped connection.
                        raise Failure("transient", f"short body ({len(body)} of {min(end, total) - start} bytes)")
                    return body, total, got_etag
                except Exception as e:
                    failure = classify_exception(e)
            elapsed = time.monotonic() - t0
            detail = self.scrub(failure.detail)
            if failure.kind == "missing":
                raise CheckpointNotFoundError(f"{where}: does not exist ({detail})")
            if failure.kind == "denied":
                raise RemoteAccessError(
                    f"{where}: {detail}; check the credentials (storage_options or the environment) and the object's "
                    "permissions"
                )
            if failure.kind == "changed":
                raise FileChangedError(
                    f"{where}: object changed since the checkpoint was opened ({detail}); reopen the checkpoint"
                )
            if failure.kind == "fatal":
                raise RemoteReadError(f"{where}: {detail}")
            attempt += 1
            if attempt > opts.retries or elapsed + delay > opts.retry_seconds:
                raise RemoteReadError(f"{where}: {detail}; gave up after {attempt} attempt(s) in {elapsed:.1f} s")
            with self._lock:
                self.retried += 1
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    def submit(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the request threads (at most ``max_requests``); a Future."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.options.max_requests, thread_name_prefix="lazysd-get")
        return self._pool.submit(fn, *args)

    def read_into(
        self, rel: str, identity: Identity, runs: list[tuple[int, int]], out: memoryview, *, where: str
    ) -> int:
        """Read file ``runs`` (absolute ``(offset, length)``) back to back into ``out``; returns GETs made."""
        requests = coalesce(runs, self.options)
        if len(requests) == 1:
            self._fetch(rel, identity, requests[0], out, where)
            return 1
        futures = [self.submit(self._fetch, rel, identity, r, out, where) for r in requests]
        first: BaseException | None = None
        for f in futures:  # wait for all, so none writes into `out` after we return
            try:
                f.result()
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first
        return len(requests)

    def _fetch(self, rel: str, identity: Identity, request: Any, out: memoryview, where: str) -> None:
        body, total, etag = self.get(rel, request.start, request.end, identity.etag, where=where)
        if total not in (-1, identity.size) or (identity.etag and etag and etag != identity.etag):
            raise FileChangedError(
                f"{where}: object changed since the checkpoint was opened (size {identity.size} -> {total}); reopen "
                "the checkpoint"
            )
        if len(body) != request.end - request.start:  # the object ends before the range: it shrank
            raise FileChangedError(
                f"{where}: object ended early ({len(body)} of {request.end - request.start} bytes); reopen the "
                "checkpoint"
            )
        view = memoryview(body)
        for out_offset, offset, n in request.pieces:
            out[out_offset : out_offset + n] = view[offset - request.start : offset - request.start + n]

    def check_identity(self, rel: str, identity: Identity, where: str) -> None:
        """For backends without conditional requests: compare size and ETag now."""
        if isinstance(self.backend, FsspecBackend):
            try:
                now = self.backend.identity(self.path_of(rel))
            except FileNotFoundError:
                raise FileChangedError(f"{where}: was deleted since the checkpoint was opened") from None
            if now != identity:
                raise FileChangedError(
                    f"{where}: object changed since the checkpoint was opened (size {identity.size} -> {now.size}); "
                    "reopen the checkpoint"
                )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _hf_root(fs: Any, url: str) -> str:
    """``hf://org/repo@rev/sub`` pinned to the commit the revision points to now.

    A commit's files never change, so a load reads one consistent checkpoint even if the
    branch moves on meanwhile.
    """
    path = fs._strip_protocol(url).rstrip("/")
    resolved = fs.resolve_path(path)
    revision = resolved.revision
    if not re.fullmatch(r"[0-9a-f]{40}", revision or ""):
        from huggingface_hub import HfApi

        info = HfApi(endpoint=fs.endpoint, token=fs.token).repo_info(
            resolved.repo_id, revision=revision, repo_type=resolved.repo_type
        )
        revision = info.sha
    prefix = "" if resolved.repo_type == "model" else f"{resolved.repo_type}s/"
    sub = f"/{resolved.path_in_repo}" if resolved.path_in_repo else ""
    return f"{prefix}{resolved.repo_id}@{revision}{sub}"


def _secret_values(storage_options: dict[str, Any], url: str) -> list[str]:
    """String values of storage_options worth hiding (and a URL's user info)."""
    out: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and len(value) >= 4:
            out.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, str) and k.lower() in ("endpoint_url", "region_name", "endpoint"):
                    continue  # where, not who: kept readable in messages
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(storage_options)
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*)@", url)
    if m:
        out += [p for p in m.group(1).split(":") if len(p) >= 2]
    return out


class RemoteCheckpoint(Checkpoint):
    """A :class:`~lazysd.checkpoint.Checkpoint` read from a URL through fsspec (see the module doc).

    Args:
        url: ``s3://bucket/prefix/``, ``https://host/dir/``, ``hf://org/repo@rev``, ...
        storage_options: keyword arguments of the fsspec filesystem (credentials, endpoint).
        options: request tuning, :class:`~lazysd.storage.RemoteOptions`.

    Attributes (besides Checkpoint's):
        requests: GETs made so far (headers, config and data; retries included).
        header_requests: GETs made while opening (config, index, headers).
    """

    local = False

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        options: RemoteOptions | None = None,
        config_required: bool = True,
    ) -> None:
        self.store = RemoteStore(url, storage_options, options or RemoteOptions())
        self.path = RemotePath(self.store.display)  # type: ignore[assignment]
        self.metadata: dict[str, dict[str, str]] = {}
        self._fds: dict[Any, int] = {}
        self._identity: dict[Any, Identity] = {}  # type: ignore[assignment]
        self._lock = threading.Lock()
        self._mappings: dict[Any, Any] = {}
        self._checked: set[str] = set()
        self._closed = False
        self.bytes_read = 0
        self.read_calls = 0
        self.header_bytes = 0
        self._finalizer = weakref.finalize(self, self.store.close)
        self._names = self.store.listing()
        self._probed: dict[str, bool] = {}
        self._small: dict[str, bytes | None] = {}
        self._index_keys: dict[str, list[str]] = {}
        self._heads: dict[str, Any] = {}  # file -> Future of its first GET (see _weight_files)
        self._to_prefetch: deque[Any] = deque()
        try:
            self.config = self._read_config(config_required)
            self.tensors = self._read_tensors()
        except BaseException:
            self.close()
            raise
        self.header_requests = self.store.requests

    def __repr__(self) -> str:
        return f"RemoteCheckpoint({str(self.path)!r}, {len(self._identity)} files)"

    @property
    def requests(self) -> int:
        return self.store.requests

    # ---- where files are -----------------------------------------------------------------
    def _check_inside(self, file: Any, where: str) -> None:
        """Objects have no symlinks; names were checked by ``_resolve_inside``."""

    def _kind(self, file: Any) -> str | None:
        return None if self._is_file(file) else "missing"

    def _is_file(self, file: Any) -> bool:
        if self._names is not None:
            return file.name in self._names
        # No listing (plain HTTP): probe small JSON files; weights files are taken on trust
        # here and a missing one fails its header GET with the keys the index gave it.
        if file.suffix == ".safetensors":
            return True
        if file.rel not in self._probed:
            self._probed[file.rel] = self._fetch_small(file) is not None
        return self._probed[file.rel]

    def _listing(self) -> list[Any]:
        return [self.path / name for name in sorted(self._names or {})]

    def _fetch_small(self, file: Any) -> bytes | None:
        """A JSON file's bytes (one GET, capped), or None if it does not exist."""
        cached = self._small
        if file.rel in cached:
            return cached[file.rel]
        try:
            body, total, _ = self.store.get(file.rel, 0, MAX_JSON_BYTES + 1, None, where=str(file))
        except CheckpointNotFoundError:
            body = None
        else:
            if total > MAX_JSON_BYTES:
                from ..errors import ConfigError

                raise ConfigError(
                    f"{file}: {total} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file of a checkpoint"
                )
        cached[file.rel] = body
        return body

    def _read_small(self, file: Any, error: type[LazySDError]) -> bytes:
        body = self._fetch_small(file)
        if body is None:
            raise CheckpointNotFoundError(f"{file}: does not exist")
        if len(body) > MAX_JSON_BYTES:
            raise error(
                f"{file}: {len(body)} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file of a checkpoint"
            )
        return body

    def _weight_files(self) -> Any:
        files, weight_map = super()._weight_files()
        if weight_map is not None:
            for key, file in weight_map.items():
                self._index_keys.setdefault(file.rel, []).append(key)
        if len(files) > 1:
            # The files' first GETs ahead of _open, max_requests at a time: opening costs a
            # round trip per max_requests files, not one per file (a 20 ms link and 50 shards:
            # 1 s), and holds at most max_requests * header_bytes. Errors surface in _open, in order.
            self._to_prefetch = deque(files)
            self._prefetch()
        return files, weight_map

    def _prefetch(self) -> None:
        while self._to_prefetch and len(self._heads) < self.store.options.max_requests:
            file = self._to_prefetch.popleft()
            self._heads[file.rel] = self.store.submit(self._first_get, file)

    # ---- headers -------------------------------------------------------------------------
    def _where(self, file: Any) -> str:
        keys = self._index_keys.get(file.rel)
        if not keys:
            return str(file)
        return f"{file} (index keys {', '.join(repr(k) for k in keys[:3])}{' ...' if len(keys) > 3 else ''})"

    def _first_get(self, file: Any) -> tuple[bytes, int, str | None]:
        """The 8-byte length and (speculatively) the header: the first ``header_bytes``."""
        return self.store.get(file.rel, 0, max(8, self.store.options.header_bytes), None, where=self._where(file))

    def _open(self, file: Any) -> dict[str, TensorInfo]:
        where = self._where(file)
        pending = self._heads.pop(file.rel, None)
        self._prefetch()
        head, size, etag = pending.result() if pending is not None else self._first_get(file)
        header_len = header_length(file, head[:8], size)
        if 8 + header_len > len(head):
            rest, _, _ = self.store.get(file.rel, len(head), 8 + header_len, etag, where=where)
            head += rest
        self._identity[file] = Identity(size, etag)
        tensors, metadata = parse_header_bytes(file, head[8 : 8 + header_len], header_len, size)
        self.metadata[file.name] = metadata
        self.header_bytes += 8 + header_len
        return tensors

    # ---- reading -------------------------------------------------------------------------
    def read_runs(
        self, info: TensorInfo, runs: list[tuple[int, int]], out: memoryview, span: tuple[int, int] | None = None
    ) -> None:
        """Read byte ranges ``(start, length)`` of a tensor back to back into ``out`` (ranged GETs;
        ``span`` is the local readahead hint, of no use here)."""
        for start, n in runs:
            if start < 0 or start + n > info.nbytes:
                raise ValueError(
                    f"{info.file}, key {info.key!r}: byte range {start}+{n} outside the tensor's {info.nbytes} bytes"
                )
        file: Any = info.file
        identity = None if self._closed else self._identity.get(file)
        if identity is None:
            raise FileChangedError(f"{file}, key {info.key!r}: checkpoint was closed")
        where = f"{file}, key {info.key!r}"
        if file.rel not in self._checked:
            self.store.check_identity(file.rel, identity, where)
            self._checked.add(file.rel)
        total = sum(n for _, n in runs)
        got = self.store.read_into(file.rel, identity, [(info.offset + s, n) for s, n in runs if n], out, where=where)
        with self._lock:
            self.bytes_read += total
            self.read_calls += got

    def read_with(self, info: TensorInfo, runs: list[tuple[int, int]], read: Any) -> None:
        raise TypeError(f"{info.file}: remote files are read with read_runs, not through a file descriptor")

    def check_unchanged(self, file: Any) -> int:
        raise TypeError(f"{file}: remote files have no descriptor")

    def mapping(self, file: Any) -> Any:
        raise ValueError(f"{file}: mmap=True maps local files only; a remote checkpoint is read into memory")

    def close(self) -> None:
        """Stop the request threads. Further reads raise :class:`FileChangedError`, as locally."""
        self._closed = True
        self.store.close()


def _status_in_chain(e: BaseException) -> int | None:
    """The HTTP status of the first response found along ``e``'s causes (``.response.status_code``)."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        cause = cause.__cause__ or cause.__context__
    return None
