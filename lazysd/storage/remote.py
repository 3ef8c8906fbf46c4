"""Remote checkpoints: the same headers, validation and exact byte ranges, over fsspec.

:class:`RemoteCheckpoint` is a :class:`~lazysd.checkpoint.Checkpoint` whose files are objects
behind a URL. Everything a local checkpoint checks (config, index, headers, shard series,
byte ranges inside tensors) is checked by the same code; only where bytes come from differs:

* headers: one ranged GET per file for the 8-byte length *and* the header (the first
  ``RemoteOptions.header_bytes``, speculatively; a second GET only for a larger header). The
  response's ``Content-Range`` gives the object's size and its ``ETag`` its identity, so no
  HEAD request is needed;
* tensor bytes: exactly the planned runs, coalesced under a gap threshold
  (:func:`~lazysd.storage.ranges.coalesce`), issued as concurrent ranged GETs, at most
  ``max_requests`` in flight per checkpoint, each response copied into the caller's memory;
* change detection: every data GET carries ``If-Match: <ETag from the header read>`` (S3 and
  HTTP), so an object replaced during a load answers 412 and raises
  :class:`~lazysd.errors.FileChangedError`; other filesystems compare the object's size and
  ETag before the first data read of each file;
* failures: timeouts, dropped connections, 5xx and throttling are retried with exponential
  backoff, bounded in attempts and seconds; 404 -> :class:`~lazysd.errors.CheckpointNotFoundError`,
  401/403 -> :class:`~lazysd.errors.RemoteAccessError`, naming the URL and the key. URLs are
  shown without credentials or query strings and ``storage_options`` never appear in messages.

Three backends: S3 through s3fs's client (``s3://``), HTTP(S) through fsspec's aiohttp session
(``https://``), and any other fsspec filesystem through its public ``info``/``cat_file``
(``gs://``, ``hf://`` ...).
"""

from __future__ import annotations

import random
import re
import threading
import time
import weakref
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


@dataclass(frozen=True)
class Identity:
    """What an object looked like when its header was read; data reads must match it."""

    size: int
    etag: str | None


class _Failure(Exception):
    """A request's outcome other than data: ``kind`` in missing/denied/changed/transient/fatal."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_S3_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable", "RequestLimitExceeded"}
_S3_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AllAccessDisabled"}


def _classify_status(status: int, what: str) -> _Failure:
    if status in (404, 410):
        return _Failure("missing", f"{what}: {status} not found")
    if status in (401, 403):
        return _Failure("denied", f"{what}: {status} access denied")
    if status == 412:
        return _Failure("changed", f"{what}: 412 precondition failed (the object's ETag changed)")
    if status in _TRANSIENT_STATUS or status >= 500:
        return _Failure("transient", f"{what}: server answered {status}")
    return _Failure("fatal", f"{what}: server answered {status}")


def _classify_exception(e: BaseException) -> _Failure:
    """Transport errors (timeouts, refused or dropped connections) are transient."""
    name = type(e).__name__
    if isinstance(e, _Failure):
        return e
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response["Error"].get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
            return _Failure("missing", f"{code} (404 not found)")
        if code in _S3_DENIED_CODES or status in (401, 403):
            return _Failure("denied", f"{code or status} (access denied)")
        if code in ("PreconditionFailed", "412") or status == 412:
            return _Failure("changed", "412 precondition failed (the object's ETag changed)")
        if code in _S3_TRANSIENT_CODES or status in _TRANSIENT_STATUS or status >= 500:
            return _Failure("transient", f"{code or 'error'} ({status})")
        return _Failure("fatal", f"{code or 'error'} ({status})")
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return _Failure("denied", "no usable credentials were found")
    if isinstance(e, (OSError, TimeoutError, EOFError)) or any(
        n in name for n in ("Timeout", "Connection", "Connect", "Incomplete", "Streaming", "Payload", "ServerDisconnected", "ClientError")
    ):
        return _Failure("transient", f"{name}")
    return _Failure("fatal", f"{name}")


class _Backend:
    """One ranged GET: ``get(path, start, end, etag) -> (body, total size, etag)``."""

    lists = True  # whether directory listings are meaningful

    def __init__(self, fs: Any, options: RemoteOptions) -> None:
        self.fs = fs
        self.options = options

    def get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _S3Backend(_Backend):
    """``get_object`` with ``Range`` and ``IfMatch`` through s3fs's own (credentialed) client."""

    def get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._get, path, start, end, etag)

    async def _get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        fs = self.fs
        bucket, key, version = fs.split_path(path)
        await fs.set_session()
        s3 = await fs.get_s3(bucket)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if etag:
            kw["IfMatch"] = etag
        if version:
            kw["VersionId"] = version
        kwargs = fs._get_s3_method_kwargs(s3.get_object, **kw)
        try:
            resp = await s3.get_object(**kwargs)
        except Exception as e:
            status = getattr(e, "response", {}) or {}
            code = status.get("Error", {}).get("Code") if isinstance(status, dict) else None
            if code == "InvalidRange" and start == 0:
                return b"", 0, None  # an empty object has no byte 0
            raise _classify_exception(e) from None
        try:
            body = await resp["Body"].read()
        except Exception as e:
            raise _classify_exception(e) from None
        finally:
            resp["Body"].close()
        return body, _total_size(resp.get("ContentRange"), resp.get("ContentLength")), resp.get("ETag")


class _HTTPBackend(_Backend):
    """Ranged GET with ``If-Match`` on fsspec's HTTP filesystem's aiohttp session."""

    lists = False  # an HTTP "directory" may or may not have an index page

    def get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._get, path, start, end, etag)

    async def _get(self, url: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        fs = self.fs
        session = await fs.set_session()
        kw = dict(fs.kwargs)
        headers = dict(kw.pop("headers", {}) or {})
        headers["Range"] = f"bytes={start}-{end - 1}"
        headers["Accept-Encoding"] = "identity"
        if etag:
            headers["If-Match"] = etag
        try:
            async with session.get(fs.encode_url(url), headers=headers, **kw) as r:
                if r.status == 416 and start == 0:
                    return b"", 0, None
                if r.status not in (200, 206):
                    raise _classify_status(r.status, "GET")
                if r.status == 200 and not (start == 0 and r.content_length is not None and r.content_length <= end):
                    raise _Failure("fatal", "the server ignored the Range request (answered 200 with the whole object)")
                body = await r.read()
                total = _total_size(r.headers.get("Content-Range"), r.content_length if r.status == 200 else None)
                return body, total, r.headers.get("ETag")
        except _Failure:
            raise
        except Exception as e:
            raise _classify_exception(e) from None


class _FsspecBackend(_Backend):
    """Any other fsspec filesystem: ``info`` for size and identity, exact ranges through ``open``.

    Files are opened unbuffered (``cache_type="none"``) with their size known, so a read of
    ``[start, end)`` fetches exactly that range (fsspec's default read-ahead cache would fetch
    a block more).
    """

    def __init__(self, fs: Any, options: RemoteOptions) -> None:
        super().__init__(fs, options)
        self._sizes: dict[str, int] = {}

    def get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        try:
            size = self._sizes.get(path)
            if size is None or etag is None:
                info = self.fs.info(path)
                size = self._sizes[path] = int(info.get("size") or 0)
                etag = _etag_of(info)
            end = min(end, size)
            if end <= start:
                return b"", size, etag
            with self.fs.open(path, "rb", cache_type="none", size=size) as f:
                f.seek(start)
                return f.read(end - start), size, etag
        except FileNotFoundError:
            raise _Failure("missing", "not found") from None
        except PermissionError:
            raise _Failure("denied", "access denied") from None
        except Exception as e:
            raise _classify_exception(e) from None

    def identity(self, path: str) -> Identity:
        info = self.fs.info(path)
        return Identity(int(info.get("size") or 0), _etag_of(info))


def _etag_of(info: dict[str, Any]) -> str | None:
    for field in ("ETag", "etag", "generation", "blob_id", "md5Hash", "mtime", "LastModified"):
        if info.get(field) is not None:
            return str(info[field])
    return None


def _total_size(content_range: str | None, content_length: int | None) -> int:
    """The object's size from ``Content-Range: bytes a-b/TOTAL`` (or a whole-object length)."""
    if content_range:
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    if content_length is not None:
        return int(content_length)
    raise _Failure("fatal", "the server's answer to a ranged GET gave no object size (Content-Range)")


def _filesystem(protocol: str, storage_options: dict[str, Any], options: RemoteOptions) -> tuple[Any, type[_Backend]]:
    """The fsspec filesystem for ``protocol``, with lazysd owning retries and timeouts."""
    try:
        import fsspec
    except ImportError:
        raise LazySDError(f"reading {protocol}:// checkpoints needs fsspec: pip install 'lazysd[remote]'") from None
    so = dict(storage_options)
    if protocol in ("s3", "s3a"):
        _need("s3fs", protocol)
        # One retry policy, lazysd's (bounded in attempts and seconds), not botocore's on top.
        config = dict(so.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        config.setdefault("connect_timeout", options.connect_timeout)
        config.setdefault("read_timeout", options.read_timeout)
        so["config_kwargs"] = config
        return fsspec.filesystem("s3", **so), _S3Backend
    if protocol in ("http", "https"):
        _need("aiohttp", protocol)
        import aiohttp

        client = dict(so.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout, sock_read=options.read_timeout))
        so["client_kwargs"] = client
        return fsspec.filesystem("http", skip_instance_cache=True, **so), _HTTPBackend
    if protocol == "hf":
        _need("huggingface_hub", protocol)
    try:
        return fsspec.filesystem(protocol, **so), _FsspecBackend
    except (ImportError, ValueError) as e:
        raise LazySDError(f"no fsspec filesystem for {protocol}:// ({str(e)[:200]}); install its package, e.g. pip install gcsfs") from None


def _need(module: str, protocol: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise LazySDError(f"reading {protocol}:// checkpoints needs {module}: pip install 'lazysd[remote]'")


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
            self.fs, backend = _filesystem(self.protocol, storage_options or {}, options)
        except LazySDError:
            raise
        except Exception as e:
            raise LazySDError(f"{self.display}: could not set up the {self.protocol}:// filesystem ({self.scrub(str(e))[:300]})") from None
        self.backend = backend(self.fs, options)
        try:
            self.root = self._root(url)
        except Exception as e:
            failure = _classify_exception(e)
            text = self.scrub(str(e))
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
            entries = self.fs.ls(self.root, detail=True)
        except Exception:
            # Listing may be denied where reading is not (a bucket policy granting GetObject
            # only) or unsupported: the index names the files, so go on without it.
            return None
        out: dict[str, int] = {}
        for entry in entries:
            if entry.get("type") == "file":
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                out[name] = int(entry.get("size") or 0)
        return out

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
                        raise _Failure("transient", f"short body ({len(body)} of {min(end, total) - start} bytes)")
                    return body, total, got_etag
                except Exception as e:
                    failure = _classify_exception(e)
            elapsed = time.monotonic() - t0
            detail = self.scrub(failure.detail)
            if failure.kind == "missing":
                raise CheckpointNotFoundError(f"{where}: does not exist ({detail})")
            if failure.kind == "denied":
                raise RemoteAccessError(f"{where}: {detail}; check the credentials (storage_options or the environment) and the object's permissions")
            if failure.kind == "changed":
                raise FileChangedError(f"{where}: object changed since the checkpoint was opened ({detail}); reopen the checkpoint")
            if failure.kind == "fatal":
                raise RemoteReadError(f"{where}: {detail}")
            attempt += 1
            if attempt > opts.retries or elapsed + delay > opts.retry_seconds:
                raise RemoteReadError(f"{where}: {detail}; gave up after {attempt} attempt(s) in {elapsed:.1f} s")
            with self._lock:
                self.retried += 1
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    def read_into(self, rel: str, identity: Identity, runs: list[tuple[int, int]], out: memoryview, *, where: str) -> int:
        """Read file ``runs`` (absolute ``(offset, length)``) back to back into ``out``; returns GETs made."""
        requests = coalesce(runs, self.options)
        if len(requests) == 1:
            self._fetch(rel, identity, requests[0], out, where)
            return 1
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.options.max_requests, thread_name_prefix="lazysd-get")
        futures = [self._pool.submit(self._fetch, rel, identity, r, out, where) for r in requests]
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
                f"{where}: object changed since the checkpoint was opened (size {identity.size} -> {total}); reopen the checkpoint"
            )
        if len(body) != request.end - request.start:  # the object ends before the range: it shrank
            raise FileChangedError(f"{where}: object ended early ({len(body)} of {request.end - request.start} bytes); reopen the checkpoint")
        view = memoryview(body)
        for out_offset, offset, n in request.pieces:
            out[out_offset : out_offset + n] = view[offset - request.start : offset - request.start + n]

    def check_identity(self, rel: str, identity: Identity, where: str) -> None:
        """For backends without conditional requests: compare size and ETag now."""
        if isinstance(self.backend, _FsspecBackend):
            try:
                now = self.backend.identity(self.path_of(rel))
            except FileNotFoundError:
                raise FileChangedError(f"{where}: was deleted since the checkpoint was opened") from None
            if now != identity:
                raise FileChangedError(f"{where}: object changed since the checkpoint was opened (size {identity.size} -> {now.size}); reopen the checkpoint")

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

        info = HfApi(endpoint=fs.endpoint, token=fs.token).repo_info(resolved.repo_id, revision=revision, repo_type=resolved.repo_type)
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
        self, url: str, *, storage_options: dict[str, Any] | None = None, options: RemoteOptions | None = None, config_required: bool = True
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

                raise ConfigError(f"{file}: {total} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file of a checkpoint")
        cached[file.rel] = body
        return body

    def _read_small(self, file: Any, error: type[LazySDError]) -> bytes:
        body = self._fetch_small(file)
        if body is None:
            raise CheckpointNotFoundError(f"{file}: does not exist")
        if len(body) > MAX_JSON_BYTES:
            raise error(f"{file}: {len(body)} bytes, over the {MAX_JSON_BYTES}-byte limit for a JSON file of a checkpoint")
        return body

    def _weight_files(self) -> Any:
        files, weight_map = super()._weight_files()
        if weight_map is not None:
            for key, file in weight_map.items():
                self._index_keys.setdefault(file.rel, []).append(key)
        return files, weight_map

    # ---- headers -------------------------------------------------------------------------
    def _open(self, file: Any) -> dict[str, TensorInfo]:
        keys = self._index_keys.get(file.rel)
        where = str(file) if not keys else f"{file} (index keys {', '.join(repr(k) for k in keys[:3])}{' ...' if len(keys) > 3 else ''})"
        head, size, etag = self.store.get(file.rel, 0, max(8, self.store.options.header_bytes), None, where=where)
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
    def read_runs(self, info: TensorInfo, runs: list[tuple[int, int]], out: memoryview) -> None:
        """Read byte ranges ``(start, length)`` of a tensor back to back into ``out`` (ranged GETs)."""
        for start, n in runs:
            if start < 0 or start + n > info.nbytes:
                raise ValueError(f"{info.file}, key {info.key!r}: byte range {start}+{n} outside the tensor's {info.nbytes} bytes")
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
