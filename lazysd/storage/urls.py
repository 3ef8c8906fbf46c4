"""URLs of remote checkpoints: which paths are remote, and how they are shown (no credentials)."""

from __future__ import annotations

import re

_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def is_remote(path: object) -> bool:
    """True for a URL lazysd reads through fsspec (``file://`` and plain paths are local)."""
    if not isinstance(path, str):
        return False
    m = _URL.match(path)
    return m is not None and m["scheme"].lower() not in ("file", "local")


def scrub_url(url: str) -> str:
    """``url`` without credentials: user info and the query string (signatures, tokens) dropped.

    Example:
        >>> scrub_url("https://user:secret@host/ckpt/?X-Amz-Signature=abc")
        'https://host/ckpt/'
    """
    m = _URL.match(url)
    if m is None:
        return url
    rest = url[m.end() :]
    host, sep, path = rest.partition("/")
    host = host.rpartition("@")[2]
    path = path.split("?", 1)[0].split("#", 1)[0]
    return f"{m['scheme']}://{host}{sep}{path}"
