"""Real storage servers on 127.0.0.1 for tests and benchmarks: S3 (moto), GCS's JSON API, HTTP
with ranges, and the Hub API.

Each counts, per client tag, the requests and body bytes it sends, and can inject faults
(status codes, throttling, connections dropped mid-body), a per-request latency and an
aggregate bandwidth cap. A client's tag is the ``lazysd-tag/NAME`` token of its User-Agent
(or an ``X-Lazysd-Tag`` header), so each rank of a test can be counted on its own.

Example:
    >>> with RangeHTTPServer("/tmp/ckpts") as http:                 # doctest: +SKIP
    ...     vsd = VirtualStateDict(http.url + "/step3p5-tiny/")
    ...     http.stats()["total"]["bytes"]
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_TAG = re.compile(r"lazysd-tag/([\w.-]+)")


@dataclass
class Faults:
    """What the server does wrong, and how slow it is. Mutable: tests change it between loads.

    ``status``: path substring -> status code answered to GETs/HEADs of matching paths.
    ``throttle``: path substring -> how many of the next matching GETs get 503 (S3: SlowDown).
    ``drop``: path substring -> how many of the next matching GETs send half the body and hang up.
    ``latency``: seconds slept before each answer. ``bandwidth``: bytes/s for all bodies together.
    """

    status: dict[str, int] = field(default_factory=dict)
    throttle: dict[str, int] = field(default_factory=dict)
    drop: dict[str, int] = field(default_factory=dict)
    latency: float = 0.0
    bandwidth: float | None = None


class _Meter:
    """Counting per tag, the fault plan, and the shared bandwidth budget."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {}
        self._next_send = time.monotonic()

    def tag(self, headers: Any) -> str:
        explicit = headers.get("X-Lazysd-Tag")
        if explicit:
            return explicit
        m = _TAG.search(headers.get("User-Agent", "") or "")
        return m.group(1) if m else "-"

    def count(self, tag: str, nbytes: int, requests: int = 1) -> None:
        with self.lock:
            for t in (tag, "total"):
                c = self.counts.setdefault(t, {"requests": 0, "bytes": 0})
                c["requests"] += requests
                c["bytes"] += nbytes

    def take(self, faults: dict[str, int], path: str) -> bool:
        with self.lock:
            for pattern, left in faults.items():
                if pattern in path and left > 0:
                    faults[pattern] = left - 1
                    return True
        return False

    def status_for(self, path: str) -> int | None:
        for pattern, code in self.faults.status.items():
            if pattern in path:
                return code
        return None

    def pace(self, nbytes: int) -> None:
        """Sleep so that all bodies together stay under the bandwidth cap."""
        bw = self.faults.bandwidth
        if not bw:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + nbytes / bw
            wait = self._next_send - now
        if wait > 0:
            time.sleep(wait)

    def stats(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {k: dict(v) for k, v in self.counts.items()}

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()


def _chunks(data: bytes, n: int = 256 << 10) -> Iterable[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


class _Server:
    def __init__(self) -> None:
        self.meter = _Meter()
        self._thread: threading.Thread | None = None
        self._server: Any = None

    @property
    def faults(self) -> Faults:
        return self.meter.faults

    def stats(self) -> dict[str, dict[str, int]]:
        """``{tag: {"requests": n, "bytes": n}}`` including ``"total"``."""
        return self.meter.stats()

    def reset(self) -> None:
        """Zero the counters and clear every fault."""
        self.meter.reset()
        self.meter.faults = Faults()

    def _serve_http(self, handler: Any) -> None:
        """Serve ``handler`` from a threaded HTTP server on a free port of 127.0.0.1 (:attr:`url`)."""
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._serve(server)

    def _serve(self, server: Any) -> None:
        self._server = server
        # A short poll: stop() waits for the serving loop to notice, 0.5 s by default.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name=type(self).__name__
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up are normal
            super().handle_error(request, client_address)


class _RangeHandler(BaseHTTPRequestHandler):
    """Serves byte ranges of local files with the meter's faults, pacing and counting.

    Bodies go out with ``os.sendfile`` (no copy through Python), in pieces the bandwidth
    cap paces, so a test or benchmark server is not itself the bottleneck of a load.
    """

    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm on, the body would
    # wait for the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    meter: _Meter
    throttled = 503  # the status a throttled request gets (S3 and most HTTP services; GCS: 429)

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def reply(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None, *, head: bool = False) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def fault(self, tag: str, name: str, *, head: bool) -> int | None:
        """Latency, then the status a fault plan assigns to object ``name`` (``throttled`` when throttled)."""
        meter = self.meter
        if meter.faults.latency:
            time.sleep(meter.faults.latency)
        code = meter.status_for(name)
        if code is None and not head and meter.take(meter.faults.throttle, name):
            code = self.throttled
        if code is not None:
            meter.count(tag, 0)
        return code

    def send_file(
        self, tag: str, name: str, file: Path, headers: dict[str, str], *, if_match: str | None, head: bool
    ) -> None:
        """``file`` (or the ``Range`` of it asked for) as the answer; 412 unless ``if_match`` holds."""
        meter = self.meter
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if if_match is not None and if_match != "*" and if_match != headers.get("ETag"):
                meter.count(tag, 0)
                return self.reply(412, head=head)
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "") or "")
            headers = {**headers, "Accept-Ranges": "bytes"}
            headers.setdefault("Content-Type", "application/octet-stream")
            if m is None:
                start, end, code = 0, size, 200
            else:
                start = int(m.group(1))
                end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                if start >= size:
                    meter.count(tag, 0)
                    return self.reply(416, headers={"Content-Range": f"bytes */{size}"}, head=head)
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if head:
                meter.count(tag, 0)
                return
            # Counted before sending: a client that has its answer must find it counted.
            if meter.take(meter.faults.drop, name):
                end = start + (end - start) // 2
                self.close_connection = True
                meter.count(tag, end - start)
                self._sendfile(f, start, end)
                self.connection.shutdown(2)
                return
            meter.count(tag, end - start)
            self._sendfile(f, start, end)

    def _sendfile(self, f: Any, start: int, end: int) -> None:
        out = self.connection.fileno()
        piece = 256 << 10 if self.meter.faults.bandwidth else 8 << 20
        while start < end:
            n = min(piece, end - start)
            self.meter.pace(n)
            while n > 0:
                sent = os.sendfile(out, f.fileno(), start, n)
                if sent == 0:
                    raise ConnectionError("client went away")
                start, n = start + sent, n - sent


class RangeHTTPServer(_Server):
    """Files under ``root`` over HTTP/1.1 with single ``Range``, ``ETag`` and ``If-Match``.

    The ETag changes when a file is replaced or rewritten (inode, size, mtime), so a client
    sending ``If-Match`` gets 412 for a changed file, as from any real web server or CDN.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__()
        root_path = Path(root)
        meter = self.meter

        class Handler(_RangeHandler):
            def _file(self) -> Path | None:
                # Some clients (the AWS C++ SDK) send the absolute form "http://host/path".
                rel = urlsplit(self.path).path if "://" in self.path else self.path.split("?", 1)[0]
                rel = unquote(rel).lstrip("/")
                target = (root_path / rel).resolve()
                if not target.is_relative_to(root_path.resolve()) or not target.is_file():
                    return None
                return target

            def do_HEAD(self) -> None:
                self._handle(head=True)

            def do_GET(self) -> None:
                self._handle(head=False)

            def _handle(self, *, head: bool) -> None:
                if self.path == "/__stats__":  # for clients in other processes (ranks)
                    return self.reply(
                        200, json.dumps(meter.stats()).encode(), {"Content-Type": "application/json"}, head=head
                    )
                tag = meter.tag(self.headers)
                code = self.fault(tag, self.path, head=head)
                if code is not None:
                    return self.reply(code, headers={"Retry-After": "0"} if code == self.throttled else None, head=head)
                file = self._file()
                if file is None:
                    meter.count(tag, 0)
                    return self.reply(404, head=head)
                st = file.stat()
                etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
                self.send_file(tag, self.path, file, {"ETag": etag}, if_match=self.headers.get("If-Match"), head=head)

        Handler.meter = meter
        self._serve_http(Handler)

    def storage_options(self, tag: str | None = None) -> dict[str, Any]:
        """fsspec HTTP options; ``tag`` names the client in :meth:`stats`."""
        return http_storage_options(tag)


class MotoS3Server(_Server):
    """moto's S3 server (as ``ThreadedMotoServer`` runs it) behind a counting, fault-injecting layer.

    ``endpoint_url`` goes into ``storage_options={"endpoint_url": ..., "key": ..., "secret": ...}``;
    :meth:`upload` copies a local directory into ``s3://bucket/prefix/``.
    """

    def __init__(self) -> None:
        super().__init__()
        from moto.server import create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        app = create_backend_app("s3")  # S3 only: no per-request lookup of the service a host means
        meter = self.meter

        def counted(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            headers = {
                "User-Agent": environ.get("HTTP_USER_AGENT", ""),
                "X-Lazysd-Tag": environ.get("HTTP_X_LAZYSD_TAG", ""),
            }
            tag = meter.tag(headers)
            path = environ.get("PATH_INFO", "")
            method = environ.get("REQUEST_METHOD", "")
            if path == "/__stats__":  # for clients in other processes (ranks)
                body = json.dumps(meter.stats()).encode()
                start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
                return [body]
            faults = meter.faults
            if method in ("GET", "HEAD") and "." in path.rsplit("/", 1)[-1]:  # object reads only
                if faults.latency:
                    time.sleep(faults.latency)
                code = meter.status_for(path)
                if code is not None:
                    meter.count(tag, 0)
                    names = {
                        403: ("AccessDenied", "Access Denied"),
                        404: ("NoSuchKey", "The specified key does not exist."),
                    }
                    err, msg = names.get(code, ("InternalError", "error"))
                    body = (
                        '<?xml version="1.0" encoding="UTF-8"?>'
                        f"<Error><Code>{err}</Code><Message>{msg}</Message></Error>"
                    ).encode()
                    start_response(
                        f"{code} Error", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
                    )
                    return [b"" if method == "HEAD" else body]
                if method == "GET" and meter.take(faults.throttle, path):
                    meter.count(tag, 0)
                    body = (
                        b'<?xml version="1.0" encoding="UTF-8"?>'
                        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    )
                    start_response(
                        "503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
                    )
                    return [body]
                if method == "GET":
                    body = b"".join(app(environ, _capture := _Capture(start_response)))
                    if _capture.status.startswith("20") and meter.take(faults.drop, path):
                        # Announce the whole body, send half: the client sees the connection end early.
                        _capture.forward()
                        meter.count(tag, len(body) // 2)
                        return _Half(body)
                    _capture.forward()
                    meter.count(tag, len(body) if _capture.status.startswith("20") else 0)
                    return _Paced(body, meter)
            return app(environ, start_response)

        server = make_server("127.0.0.1", 0, counted, threaded=True, request_handler=Quiet)
        self.endpoint_url = f"http://127.0.0.1:{server.server_port}"
        self._serve(server)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def storage_options(self, tag: str | None = None) -> dict[str, Any]:
        """fsspec options for this server; ``tag`` names the client in :meth:`stats`."""
        config: dict[str, Any] = {}
        if tag is not None:
            config["user_agent_extra"] = f"lazysd-tag/{tag}"
        return {
            "endpoint_url": self.endpoint_url,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": config,
        }

    def upload(self, local: str | os.PathLike[str], bucket: str, prefix: str) -> str:
        """Copy the files of directory ``local`` to ``s3://bucket/prefix/``; returns that URL."""
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        for file in sorted(Path(local).iterdir()):
            if file.is_file():
                s3.upload_file(str(file), bucket, f"{prefix}/{file.name}")
        return f"s3://{bucket}/{prefix}/"


class _Capture:
    """start_response recorder: the answer is sent only after the fault decision."""

    def __init__(self, start_response: Any) -> None:
        self.start_response = start_response
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.status, self.headers = status, headers
        return lambda data: None

    def forward(self) -> None:
        self.start_response(self.status, self.headers)


class _Half:
    """A WSGI body that yields half of what Content-Length announced, then fails (connection cut)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Any:
        yield self.body[: len(self.body) // 2]
        raise ConnectionAbortedError("dropped by the test server")


class _Paced:
    def __init__(self, body: bytes, meter: _Meter) -> None:
        self.body, self.meter = body, meter

    def __iter__(self) -> Any:
        for chunk in _chunks(self.body):
            self.meter.pace(len(chunk))
            yield chunk


def http_storage_options(tag: str | None = None) -> dict[str, Any]:
    """fsspec HTTP options tagging a client for :meth:`RangeHTTPServer.stats`."""
    return {} if tag is None else {"client_kwargs": {"headers": {"X-Lazysd-Tag": tag}}}


def server_stats(base_url: str) -> dict[str, dict[str, int]]:
    """A server's counters fetched over HTTP (``{base_url}/__stats__``), from any process."""
    from urllib.request import urlopen

    with urlopen(f"{base_url}/__stats__", timeout=10) as r:
        return json.loads(r.read())


class FakeGCSServer(_Server):
    """The part of Google Cloud Storage's JSON API that ``gcsfs`` and lazysd use, over local files.

    ``buckets`` maps bucket names to local directories; an object's name is a file's path
    below its directory. Answered: bucket metadata (``GET /storage/v1/b/{bucket}``), object
    listings with ``prefix``, ``delimiter`` and pages (``GET /storage/v1/b/{bucket}/o``),
    object metadata (``GET /storage/v1/b/{bucket}/o/{object}``) and media downloads
    (``alt=media``, also under ``/download/storage/v1/...``) honouring ``Range``. Every
    object has a ``generation`` that changes when its file is replaced or rewritten, sent
    as ``x-goog-generation`` with the media; ``ifGenerationMatch`` (and ``generation``)
    are checked as GCS does (412, and 404 for a generation that is gone). Errors are GCS's
    JSON error bodies; throttling answers 429 (``rateLimitExceeded``).

    Point gcsfs at it with ``storage_options={"endpoint_url": url, "token": "anon"}`` (or
    ``STORAGE_EMULATOR_HOST``).
    """

    def __init__(self, buckets: dict[str, str | os.PathLike[str]]) -> None:
        super().__init__()
        roots = {name: Path(d).resolve() for name, d in buckets.items()}
        meter = self.meter
        generations: dict[tuple[int, int, int], int] = {}
        lock = threading.Lock()

        def generation(st: os.stat_result) -> int:
            with lock:  # a new number (as GCS's, increasing) for each version of a file
                return generations.setdefault(
                    (st.st_ino, st.st_size, st.st_mtime_ns), 1_700_000_000_000_000 + len(generations)
                )

        def resource(bucket: str, name: str, file: Path) -> dict[str, Any]:
            st = file.stat()
            gen = generation(st)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(st.st_mtime))
            return {
                "kind": "storage#object",
                "id": f"{bucket}/{name}/{gen}",
                "name": name,
                "bucket": bucket,
                "generation": str(gen),
                "metageneration": "1",
                "contentType": "application/octet-stream",
                "size": str(st.st_size),
                "etag": f"{gen:x}",
                "timeCreated": stamp,
                "updated": stamp,
                "storageClass": "STANDARD",
            }

        class Handler(_RangeHandler):
            throttled = 429

            def error(self, code: int, message: str, reason: str, *, head: bool = False) -> None:
                body = json.dumps({"error": {"code": code, "message": message, "errors": [{"reason": reason}]}})
                self.reply(code, body.encode(), {"Content-Type": "application/json"}, head=head)

            def json(self, value: Any, *, head: bool = False) -> None:
                self.reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, head=head)

            def do_GET(self) -> None:
                self._handle(head=False)

            def do_HEAD(self) -> None:
                self._handle(head=True)

            def _handle(self, *, head: bool) -> None:
                url = urlsplit(self.path)
                if url.path == "/__stats__":
                    return self.json(meter.stats(), head=head)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                path = url.path
                media = query.get("alt") == "media"
                if path.startswith("/download/storage/v1/"):
                    path, media = path[len("/download") :], True
                m = re.fullmatch(r"/storage/v1/b/(?P<bucket>[^/]+)(?:/o(?:/(?P<object>.+))?)?", path)
                if m is None or unquote(m["bucket"]) not in roots:
                    return self.error(404, "The specified bucket does not exist.", "notFound", head=head)
                bucket = unquote(m["bucket"])
                if m["object"] is None:
                    if path.endswith("/o"):
                        return self._list(bucket, query, head=head)
                    return self.json({"kind": "storage#bucket", "name": bucket, "id": bucket}, head=head)
                name = unquote(m["object"])
                tag = meter.tag(self.headers)
                code = self.fault(tag, name, head=head)
                if code == 429:
                    return self.error(429, "The rate of requests exceeds the limit.", "rateLimitExceeded", head=head)
                if code is not None:
                    reasons = {403: "forbidden", 404: "notFound"}
                    message = (
                        f"anonymous caller does not have storage.objects.get access to {bucket}/{name}."
                        if code == 403
                        else f"No such object: {bucket}/{name}"
                    )
                    return self.error(code, message, reasons.get(code, "backendError"), head=head)
                file = (roots[bucket] / name).resolve()
                if not file.is_relative_to(roots[bucket]) or not file.is_file():
                    meter.count(tag, 0)
                    return self.error(404, f"No such object: {bucket}/{name}", "notFound", head=head)
                meta = resource(bucket, name, file)
                if "generation" in query and query["generation"] != meta["generation"]:
                    meter.count(tag, 0)
                    return self.error(404, f"No such object: {bucket}/{name}", "notFound", head=head)
                if "ifGenerationMatch" in query and query["ifGenerationMatch"] != meta["generation"]:
                    meter.count(tag, 0)
                    return self.error(
                        412,
                        "At least one of the pre-conditions you specified did not hold.",
                        "conditionNotMet",
                        head=head,
                    )
                if not media:
                    meter.count(tag, 0)
                    return self.json(meta, head=head)
                headers = {
                    "ETag": f'"{meta["etag"]}"',
                    "x-goog-generation": meta["generation"],
                    "x-goog-metageneration": "1",
                    "x-goog-stored-content-length": meta["size"],
                    "x-goog-storage-class": "STANDARD",
                }
                self.send_file(tag, name, file, headers, if_match=self.headers.get("If-Match"), head=head)

            def _list(self, bucket: str, query: dict[str, str], *, head: bool) -> None:
                root, prefix, delimiter = roots[bucket], query.get("prefix", ""), query.get("delimiter", "")
                names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
                items, prefixes = [], set()
                for name in names:
                    if not name.startswith(prefix):
                        continue
                    rest = name[len(prefix) :]
                    if delimiter and delimiter in rest:
                        prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                    else:
                        items.append(name)
                entries = sorted([(n, False) for n in items] + [(p, True) for p in prefixes])
                first = int(query.get("pageToken") or 0)
                size = max(1, int(query.get("maxResults") or 1000))
                page = entries[first : first + size]
                out: dict[str, Any] = {
                    "kind": "storage#objects",
                    "items": [resource(bucket, n, root / n) for n, is_prefix in page if not is_prefix],
                    "prefixes": [n for n, is_prefix in page if is_prefix],
                }
                if first + size < len(entries):
                    out["nextPageToken"] = str(first + size)
                self.json(out, head=head)

        Handler.meter = meter
        self._serve_http(Handler)

    def storage_options(self, tag: str | None = None) -> dict[str, Any]:
        """gcsfs options for this server (anonymous); ``tag`` names the client in :meth:`stats`."""
        options: dict[str, Any] = {"endpoint_url": self.url, "token": "anon", "project": "lazysd-tests"}
        if tag is not None:
            options["session_kwargs"] = {"headers": {"X-Lazysd-Tag": tag}}
        return options


class FakeHubServer(RangeHTTPServer):
    """The part of the Hugging Face Hub's HTTP API that ``HfFileSystem`` reads through.

    ``repos`` maps repo ids (``"org/name"``) to local checkpoint directories, each served as
    one commit (its sha given by :attr:`sha`) that branch ``main`` points to: repo info
    (``/api/models/{id}/revision/{rev}``), file listings (``/tree/``), ``paths-info`` and
    ranged ``/{id}/resolve/{rev}/{file}``. Point ``HfFileSystem(endpoint=url)`` (or
    ``HF_ENDPOINT``) at :attr:`url`.
    """

    sha = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, repos: dict[str, str | os.PathLike[str]], *, gated: tuple[str, ...] = ()) -> None:
        import hashlib

        files = {rid: {p.name: p for p in sorted(Path(d).iterdir()) if p.is_file()} for rid, d in repos.items()}
        files.update({rid: {} for rid in gated})
        sha = self.sha

        def entry(rid: str, name: str) -> dict[str, Any]:
            path = files[rid][name]
            return {
                "type": "file",
                "path": name,
                "size": path.stat().st_size,
                "oid": hashlib.sha1(name.encode()).hexdigest(),
            }

        def api(handler: BaseHTTPRequestHandler, method: str) -> bool:
            """Answer an API call; False for a plain (resolve) GET."""
            path = urlsplit(handler.path).path
            m = re.fullmatch(
                r"/api/models/(?P<rid>[^/]+/[^/]+)(?:/(?P<what>revision|tree|paths-info)/(?P<rev>[^/]+)(?:/(?P<sub>.*))?)?",
                path,
            )
            if m is None:
                return False
            rid, what, rev = m["rid"], m["what"] or "revision", unquote(m["rev"] or "main")
            gate = rid in gated  # as the Hub answers for a gated repo the token may not read
            if gate:
                body, code = json.dumps({"error": f"Access to model {rid} is restricted."}).encode(), 403
            elif rid not in files or rev not in ("main", sha):
                body, code = json.dumps({"error": "Repository Not Found"}).encode(), 404
            elif what == "revision":
                body = json.dumps(
                    {"id": rid, "modelId": rid, "sha": sha, "siblings": [{"rfilename": n} for n in files[rid]]}
                ).encode()
                code = 200
            elif what == "tree":
                body, code = json.dumps([entry(rid, n) for n in files[rid]]).encode(), 200
            else:  # paths-info: form or JSON body naming paths
                length = int(handler.headers.get("Content-Length") or 0)
                raw = handler.rfile.read(length).decode() if length else ""
                from urllib.parse import parse_qs

                try:
                    wanted = json.loads(raw).get("paths", [])
                except ValueError:
                    wanted = parse_qs(raw).get("paths", [])
                body, code = json.dumps([entry(rid, n) for n in wanted if n in files[rid]]).encode(), 200
            handler.send_response(code)
            handler.send_header("Content-Type", "application/json")
            if gate:
                handler.send_header("X-Error-Code", "GatedRepo")
                handler.send_header("X-Error-Message", "Access to this model is restricted.")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(body)
            return True

        # Resolve URLs map onto a directory tree: root/{org}/{name}/resolve/{rev}/{file}.
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="lazysd-fakehub-")
        root = Path(self._tmp.name)
        for rid, names in files.items():
            for rev in ("main", sha):
                d = root / rid / "resolve" / rev
                d.mkdir(parents=True, exist_ok=True)
                for name, src in names.items():
                    os.link(src, d / name) if _same_device(src, d) else (d / name).write_bytes(src.read_bytes())
        super().__init__(root)
        handler_cls = self._server.RequestHandlerClass
        plain_get, plain_head = handler_cls.do_GET, handler_cls.do_HEAD

        def do_GET(handler: BaseHTTPRequestHandler) -> None:
            if not api(handler, "GET"):
                plain_get(handler)

        def do_HEAD(handler: BaseHTTPRequestHandler) -> None:
            if not api(handler, "HEAD"):
                plain_head(handler)

        def do_POST(handler: BaseHTTPRequestHandler) -> None:
            if not api(handler, "POST"):
                handler.send_response(404)
                handler.send_header("Content-Length", "0")
                handler.end_headers()

        handler_cls.do_GET, handler_cls.do_HEAD, handler_cls.do_POST = do_GET, do_HEAD, do_POST  # type: ignore[method-assign]

    def stop(self) -> None:
        super().stop()
        self._tmp.cleanup()


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev
