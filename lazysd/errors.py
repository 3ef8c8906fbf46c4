"""Exceptions raised by lazysd.

Every error lazysd raises on purpose is a :class:`LazySDError`. Where a builtin exception
means the same thing, the lazysd class also derives from it, so ``except KeyError`` keeps
working for a missing key and ``except FileNotFoundError`` for a missing checkpoint.
Messages name the file and the key involved, say what was expected and what was found.
"""

from __future__ import annotations

from typing import Any


def shortened(items: list[str], n: int = 8) -> list[str]:
    """``items`` cut to ``n`` for a message, the rest counted: ``[..., '... 3 more']``."""
    return items if len(items) <= n else items[:n] + [f"... {len(items) - n} more"]


def cut(text: str, n: int = 200) -> str:
    """A key or file name from a checkpoint, cut to ``n`` characters for a message."""
    return text if len(text) <= n else text[: n - 3] + "..."


def repr_cut(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to ``n`` characters: header values are untrusted and may be huge."""
    return cut(repr(value), n)


#: The longest message a lazysd error keeps. Messages quote keys, file names and values
#: from checkpoints, which may be huge (a 1 MB key): each is clipped where it is quoted, and
#: this bounds what is left (the middle is cut, the head and the tail are kept).
MAX_MESSAGE_CHARS = 8000


class LazySDError(Exception):
    """Base class of every error lazysd raises on purpose."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE_CHARS:
            text, half = args[0], MAX_MESSAGE_CHARS // 2
            args = (f"{text[:half]} ... [{len(text) - 2 * half} characters cut] ... {text[-half:]}",)
        super().__init__(*args)


class CheckpointNotFoundError(LazySDError, FileNotFoundError):
    """The checkpoint directory, a weights file or config.json does not exist."""


class NoWeightsError(LazySDError, FileNotFoundError):
    """The directory holds no ``*.safetensors`` file (pickled weights are never loaded)."""


class HeaderError(LazySDError, ValueError):
    """A safetensors file's header is malformed or contradicts the file."""


class CheckpointIndexError(LazySDError, ValueError):
    """``model.safetensors.index.json`` contradicts the files it names, or is malformed."""


class ConfigError(LazySDError, ValueError):
    """config.json is missing, malformed, or contradicts the tensors."""


class UnknownModelError(LazySDError, ValueError):
    """No adapter matches the checkpoint's ``model_type``."""


class UnclaimedKeyError(LazySDError, ValueError):
    """Checkpoint keys that no rule of the adapter claims (never dropped silently)."""


class MissingSourceError(LazySDError, ValueError):
    """A native tensor lacks one of the HF tensors it is built from (e.g. a gate without its up)."""


class UnsupportedFormatError(LazySDError, ValueError):
    """Checkpoint tensors in a storage format lazysd recognizes but does not convert (e.g. MXFP4)."""


class ShapeMismatchError(LazySDError, ValueError):
    """HF tensors that feed one native tensor have incompatible shapes or dtypes."""


class FileChangedError(LazySDError, OSError):
    """A weights file was truncated, replaced or modified after the checkpoint was opened."""


class UnsafePathError(LazySDError, ValueError):
    """The index names a file outside the checkpoint directory."""


class PlacementError(LazySDError, ValueError):
    """A mesh or placement request that cannot be honoured (wrong shape, no expert dim, ...)."""


class ExportError(LazySDError, ValueError):
    """An export that cannot be done safely: output is the source or not empty, ranks disagree, ..."""


class ExportDTypeError(LazySDError, TypeError):
    """A tensor to write has a dtype safetensors cannot store, or not the dtype declared for it."""


class StateDictMismatchError(LazySDError, RuntimeError):
    """``lazysd.load(..., strict=True)``: the model's keys and the checkpoint's differ."""


class MissingKeyError(LazySDError, KeyError):
    """A key that the VirtualStateDict does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class TooManyFilesError(LazySDError, OSError):
    """The checkpoint has more weights files than the process may hold open (``RLIMIT_NOFILE``)."""


class ReadOnlyTensorError(LazySDError, RuntimeError):
    """An in-place operation on a lazy value of a read-only mapping (it would change a throw-away copy)."""


class OptionError(LazySDError, ValueError):
    """An argument or option lazysd cannot use (an unknown mode, a bad filter, options that
    cannot apply to an object already open)."""


class RuleError(LazySDError, ValueError):
    """An adapter's rules or key patterns are malformed (checked when they are defined)."""


class WriterError(LazySDError, ValueError):
    """A safetensors writer used out of order or given a tensor that does not fit its plan."""


class RemoteAccessError(LazySDError, PermissionError):
    """A remote checkpoint refused access (401/403, no credentials); the message names URL and key."""


class RemoteReadError(LazySDError, OSError):
    """A remote read failed: unreachable endpoint, retries exhausted, a server not honouring ranges."""
