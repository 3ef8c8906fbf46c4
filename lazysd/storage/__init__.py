"""Where checkpoint bytes come from: local files, or remote objects through fsspec.

A checkpoint path is local unless it is a URL (``s3://``, ``gs://``, ``https://``,
``hf://`` ...; any ``scheme://`` that fsspec knows) or a Hub repo id with ``remote=True``.
Local paths go to :class:`lazysd.checkpoint.Checkpoint` and import nothing remote; URLs go
to :class:`lazysd.storage.remote.RemoteCheckpoint`, which needs the ``remote`` extra
(``pip install lazysd[remote]``: fsspec, s3fs, gcsfs, huggingface_hub, aiohttp).

Both expose the same small interface to the rest of lazysd: ``config``, ``tensors``
(key -> :class:`~lazysd.checkpoint.TensorInfo`), ``read_runs(info, runs, out)`` (exact
byte ranges of one tensor into caller memory), ``files``, ``bytes_read``, ``read_calls``
(one per storage request), ``close()``.

Example:
    >>> ckpt = open_checkpoint("s3://bucket/Step-3.5-Flash/", storage_options={"anon": True})  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from ..errors import OptionError
from .ranges import RemoteOptions, coalesce
from .urls import is_remote, scrub_url

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

__all__ = ["RemoteOptions", "coalesce", "is_remote", "open_checkpoint", "scrub_url"]

# A Hub repo id: "org/name" (no scheme, not an existing local path).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    remote: bool | RemoteOptions = False,
    revision: str | None = None,
    config_required: bool = True,
) -> Checkpoint:
    """The checkpoint at ``path``: a local :class:`~lazysd.checkpoint.Checkpoint` or a remote one.

    Args:
        path: a local directory, a URL (``s3://bucket/prefix/``, ``https://host/dir/``,
            ``hf://org/repo@rev`` ...), or with ``remote=True`` a Hub repo id ``org/name``.
        storage_options: passed to the fsspec filesystem (credentials, endpoint, ...).
        remote: True (or :class:`RemoteOptions` to tune requests) reads a repo id from the Hub.
        revision: branch, tag or commit of a Hub repo id.
        config_required: False lets a checkpoint without config.json open (config ``{}``).
    """
    if remote and isinstance(path, str) and not is_remote(path) and _REPO_ID.match(path) and not os.path.exists(path):
        path = f"hf://{path}"  # the revision is added below
    if isinstance(path, str) and revision is not None and path.startswith("hf://"):
        head = "/".join(path[5:].split("/")[:2])
        if "@" in head:
            raise OptionError(f"{scrub_url(path)}: the URL names a revision already; leave out revision={revision!r}")
        path = f"hf://{head}@{revision}" + path[5 + len(head) :]
    if is_remote(path):
        from .remote import RemoteCheckpoint

        options = remote if isinstance(remote, RemoteOptions) else RemoteOptions()
        return RemoteCheckpoint(
            str(path), storage_options=storage_options, options=options, config_required=config_required
        )
    if storage_options:
        raise OptionError(
            f"{path}: storage_options apply to remote checkpoints (s3://, https://, hf:// ...), not to a local path"
        )
    from ..checkpoint import Checkpoint

    return Checkpoint(path, revision=revision, config_required=config_required)
