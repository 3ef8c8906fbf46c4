"""Ranged GETs against object stores: one backend per protocol, and what a failure means.

:class:`S3Backend` (s3fs's client, ``If-Match`` on every GET), :class:`HTTPBackend` (fsspec's
aiohttp session), :class:`GCSBackend` (gcsfs's session, ``ifGenerationMatch`` on every GET)
and :class:`FsspecBackend` (any other fsspec filesystem through its public ``info`` and
``open``) all answer ``get(path, start, end, etag) -> (bytes, object size, etag)``.
Errors become a :class:`Failure` whose ``kind`` says whether a retry can help (timeouts,
dropped connections, 5xx, throttling) or not (404, 401/403, 412 for a replaced object);
:class:`~lazysd.storage.remote.RemoteStore` turns them into lazysd errors naming the URL and key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LazySDError
from .ranges import RemoteOptions


@dataclass(frozen=True)
class Identity:
    """What an object looked like when its header was read; data reads must match it."""

    size: int
    etag: str | None


class Failure(Exception):
    """A request's outcome other than data: ``kind`` in missing/denied/changed/transient/fatal."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


_S3_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
}


_S3_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}


def classify_status(status: int, what: str) -> Failure:
    if status in (404, 410):
        return Failure("missing", f"{what}: {status} not found")
    if status in (401, 403):
        return Failure("denied", f"{what}: {status} access denied")
    if status == 412:
        return Failure("changed", f"{what}: 412 precondition failed (the object's ETag changed)")
    if status in _TRANSIENT_STATUS or status >= 500:
        return Failure("transient", f"{what}: server answered {status}")
    return Failure("fatal", f"{what}: server answered {status}")


def classify_exception(e: BaseException) -> Failure:
    """Transport errors (timeouts, refused or dropped connections) are transient."""
    name = type(e).__name__
    if isinstance(e, Failure):
        return e
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response["Error"].get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
            return Failure("missing", f"{code} (404 not found)")
        if code in _S3_DENIED_CODES or status in (401, 403):
            return Failure("denied", f"{code or status} (access denied)")
        if code in ("PreconditionFailed", "412") or status == 412:
            return Failure("changed", "412 precondition failed (the object's ETag changed)")
        if code in _S3_TRANSIENT_CODES or status in _TRANSIENT_STATUS or status >= 500:
            return Failure("transient", f"{code or 'error'} ({status})")
        return Failure("fatal", f"{code or 'error'} ({status})")
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return Failure("denied", "no usable credentials were found")
    if isinstance(e, (OSError, TimeoutError, EOFError)) or any(
        n in name
        for n in (
            "Timeout",
            "Connection",
            "Connect",
            "Incomplete",
            "Streaming",
            "Payload",
            "ServerDisconnected",
            "ClientError",
        )
    ):
        return Failure("transient", f"{name}")
    return Failure("fatal", f"{name}")


class Backend:
    """One ranged GET: ``get(path, start, end, etag) -> (body, total size, etag)``."""

    lists = True  # whether directory listings are meaningful

    def __init__(self, fs: Any, options: RemoteOptions) -> None:
        self.fs = fs
        self.options = options

    def listing(self, root: str) -> dict[str, int]:
        """Names (relative to ``root``) -> sizes of the files directly under ``root``."""
        out: dict[str, int] = {}
        for entry in self.fs.ls(root, detail=True):
            if entry.get("type") == "file":
                name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
                out[name] = int(entry.get("size") or 0)
        return out

    def get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _AsyncBackend(Backend):
    """A backend whose GET is a coroutine (``_get``) on the filesystem's event loop."""

    def get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._get, path, start, end, etag)

    async def _get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        raise NotImplementedError


class _AsyncListing(_AsyncBackend):
    """A backend that lists through its client's own requests (``_listing``, a coroutine on
    the filesystem's event loop), not the filesystem's retrying ``ls``."""

    def listing(self, root: str) -> dict[str, int]:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self._listing, root)

    async def _listing(self, root: str) -> dict[str, int]:
        raise NotImplementedError


class S3Backend(_AsyncListing):
    """``get_object`` with ``Range`` and ``IfMatch`` through s3fs's own (credentialed) client."""

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
            raise classify_exception(e) from None
        try:
            body = await resp["Body"].read()
        except Exception as e:
            raise classify_exception(e) from None
        finally:
            resp["Body"].close()
        return body, _total_size(resp.get("ContentRange"), resp.get("ContentLength")), resp.get("ETag")

    async def _listing(self, root: str) -> dict[str, int]:
        # Through the client, not s3fs's ls: s3fs retries a failed listing for ~2 s on its own.
        fs = self.fs
        bucket, key, _ = fs.split_path(root)
        prefix = f"{key.rstrip('/')}/" if key else ""
        await fs.set_session()
        s3 = await fs.get_s3(bucket)
        out: dict[str, int] = {}
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
        while True:
            page = await s3.list_objects_v2(**fs._get_s3_method_kwargs(s3.list_objects_v2, **kw))
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix) :]
                if name:
                    out[name] = int(item.get("Size") or 0)
            if not page.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = page["NextContinuationToken"]


class HTTPBackend(_AsyncBackend):
    """Ranged GET with ``If-Match`` on fsspec's HTTP filesystem's aiohttp session."""

    lists = False  # an HTTP "directory" may or may not have an index page

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
                return await _ranged_answer(r, start, end, r.headers.get("ETag"))
        except Failure:
            raise
        except Exception as e:
            raise classify_exception(e) from None


class GCSBackend(_AsyncListing):
    """Google Cloud Storage's JSON API on gcsfs's session and credentials, with lazysd's retries.

    A media GET with ``Range``; the answer's ``x-goog-generation`` is the object's identity,
    and every later GET of it carries ``ifGenerationMatch``, so a replaced object answers 412
    (:class:`~lazysd.errors.FileChangedError`) instead of other bytes. gcsfs's own calls
    retry on their own (six attempts, 1 to 16 s apart) and report a 403 as a bare OSError;
    lazysd issues its requests itself so that one bounded policy applies (listing included)
    and each status keeps its meaning.
    """

    def _timeout(self) -> Any:
        import aiohttp

        o = self.options
        return aiohttp.ClientTimeout(total=None, sock_connect=o.connect_timeout, sock_read=o.read_timeout)

    async def _get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
        from urllib.parse import quote

        fs = self.fs
        bucket, key, generation = fs.split_path(path)
        params = {"alt": "media"}
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        if generation:
            params["generation"] = str(generation)
        if etag and etag.isdigit():  # a generation number
            params["ifGenerationMatch"] = etag
        elif etag:  # a server that sent no generation: its ETag
            headers["If-Match"] = etag
        url = f"{fs._location}/download/storage/v1/b/{quote(bucket, safe='')}/o/{quote(key, safe='')}"
        try:
            session = await fs._set_session()
            async with session.get(
                url, params=fs._get_params(params), headers=fs._get_headers(headers), timeout=self._timeout()
            ) as r:
                return await _ranged_answer(r, start, end, r.headers.get("x-goog-generation") or r.headers.get("ETag"))
        except Failure:
            raise
        except Exception as e:
            raise classify_exception(e) from None

    async def _listing(self, root: str) -> dict[str, int]:
        from urllib.parse import quote

        fs = self.fs
        bucket, key, _ = fs.split_path(root)
        prefix = f"{key.rstrip('/')}/" if key else ""
        url = f"{fs._location}/storage/v1/b/{quote(bucket, safe='')}/o"
        out: dict[str, int] = {}
        token = None
        session = await fs._set_session()
        while True:
            params = {
                "prefix": prefix,
                "delimiter": "/",
                "maxResults": "1000",
                "fields": "items(name,size),nextPageToken",
            }
            if token:
                params["pageToken"] = token
            async with session.get(
                url, params=fs._get_params(params), headers=fs._get_headers(None), timeout=self._timeout()
            ) as r:
                if r.status != 200:
                    raise classify_status(r.status, "list")
                page = await r.json(content_type=None)
            for item in page.get("items", []):
                name = item["name"][len(prefix) :]
                if name:  # not a folder placeholder object "prefix/"
                    out[name] = int(item.get("size") or 0)
            token = page.get("nextPageToken")
            if not token:
                return out


class FsspecBackend(Backend):
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
            raise Failure("missing", "not found") from None
        except PermissionError:
            raise Failure("denied", "access denied") from None
        except Exception as e:
            raise classify_exception(e) from None

    def identity(self, path: str) -> Identity:
        info = self.fs.info(path)
        return Identity(int(info.get("size") or 0), _etag_of(info))


def _etag_of(info: dict[str, Any]) -> str | None:
    for field in ("ETag", "etag", "generation", "blob_id", "md5Hash", "mtime", "LastModified"):
        if info.get(field) is not None:
            return str(info[field])
    return None


async def _ranged_answer(r: Any, start: int, end: int, etag: str | None) -> tuple[bytes, int, str | None]:
    """``(body, object size, etag)`` of an aiohttp answer to a GET of bytes ``[start, end)``
    (``etag``: the identity its headers give): ``(b"", 0, None)`` for an empty object (416 on
    byte 0), a :class:`Failure` for any other error status or a server that ignored the
    ``Range``."""
    if r.status == 416 and start == 0:
        return b"", 0, None
    if r.status not in (200, 206):
        raise classify_status(r.status, "GET")
    if r.status == 200 and not (start == 0 and r.content_length is not None and r.content_length <= end):
        raise Failure("fatal", "the server ignored the Range request (answered 200 with the whole object)")
    body = await r.read()
    return body, _total_size(r.headers.get("Content-Range"), r.content_length if r.status == 200 else None), etag


def _total_size(content_range: str | None, content_length: int | None) -> int:
    """The object's size from ``Content-Range: bytes a-b/TOTAL`` (or a whole-object length)."""
    if content_range:
        total = content_range.rpartition("/")[2]
        if total.isdigit():
            return int(total)
    if content_length is not None:
        return int(content_length)
    raise Failure("fatal", "the server's answer to a ranged GET gave no object size (Content-Range)")


def filesystem(protocol: str, storage_options: dict[str, Any], options: RemoteOptions) -> tuple[Any, type[Backend]]:
    """The fsspec filesystem for ``protocol``, with lazysd owning retries and timeouts."""
    try:
        import fsspec
    except ImportError:
        raise LazySDError(f"reading {protocol}:// checkpoints needs fsspec: pip install 'lazysd[remote]'") from None
    so = dict(storage_options)
    if protocol in ("s3", "s3a"):
        _need("s3fs", protocol)
        # One retry policy, lazysd's (bounded in attempts and seconds), not botocore's on top:
        # one attempt per request (botocore's "max_attempts" would count retries, not attempts).
        config = dict(so.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        config.setdefault("connect_timeout", options.connect_timeout)
        config.setdefault("read_timeout", options.read_timeout)
        so["config_kwargs"] = config
        return fsspec.filesystem("s3", **so), S3Backend
    if protocol in ("http", "https"):
        _need("aiohttp", protocol)
        import aiohttp

        client = dict(so.get("client_kwargs") or {})
        client.setdefault(
            "timeout",
            aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout, sock_read=options.read_timeout),
        )
        so["client_kwargs"] = client
        return fsspec.filesystem("http", skip_instance_cache=True, **so), HTTPBackend
    if protocol in ("gs", "gcs"):
        _need("gcsfs", protocol)
        return fsspec.filesystem("gs", **so), GCSBackend
    if protocol == "hf":
        _need("huggingface_hub", protocol)
    try:
        return fsspec.filesystem(protocol, **so), FsspecBackend
    except (ImportError, ValueError) as e:
        raise LazySDError(
            f"no fsspec filesystem for {protocol}:// ({str(e)[:200]}); install its package, e.g. pip install gcsfs"
        ) from None


def _need(module: str, protocol: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise LazySDError(f"reading {protocol}:// checkpoints needs {module}: pip install 'lazysd[remote]'")
