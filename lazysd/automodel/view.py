"""``HFCheckpointView``: a checkpoint's tensors under their HF keys, lazy (the input ``from_hf`` keeps lazy)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Self

import torch

from ..errors import MissingKeyError
from ..geometry import full_box
from ..lazy import LazyTensor
from ..plan import Entry, Source
from ..reader import MiB, Reader, ReadOptions
from ..rules import Rule
from ..storage import open_checkpoint

__all__ = ["HFCheckpointView"]

_STORED = Rule("{key}")  # the rule of a tensor exposed as stored


class HFCheckpointView(Mapping[str, torch.Tensor]):
    """A checkpoint directory's tensors under their HF keys, read only when used.

    The input ``from_hf`` turns into lazy native tensors: pass it where Automodel passes the
    HF state dict and nothing is read until parameters are filled, each rank reading only
    its experts. Opening reads config.json and headers only.

    Args:
        path: checkpoint directory (``config.json`` + ``*.safetensors`` [+ index]), or a URL
            (``s3://``, ``https://``, ``hf://`` ...; ``storage_options`` as for
            :class:`~lazysd.VirtualStateDict`).
        threads, chunk_bytes, max_inflight_bytes: read options, as for
            :class:`~lazysd.VirtualStateDict`.

    Example:
        >>> hf = HFCheckpointView("/ckpt/Step-3.5-Flash")                         # doctest: +SKIP
        >>> native = Step3p5StateDictAdapter(cfg, moe_cfg, None).from_hf(hf)      # doctest: +SKIP
        >>> hf.bytes_read                                                         # doctest: +SKIP
        0
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        chunk_bytes: int | None = None,
        max_inflight_bytes: int = 32 * MiB,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.checkpoint = open_checkpoint(path, storage_options=storage_options)
        if not self.checkpoint.local:
            threads = max(threads or 0, 8)  # latency-bound: more requests in flight
        self.reader = Reader(self.checkpoint, ReadOptions(threads, chunk_bytes, max_inflight_bytes))
        # Every tensor is the view's to read: cold reads may stream on across them.
        self.reader.own = lambda: [(self._entry(k), full_box(i.shape)) for k, i in self.checkpoint.tensors.items()]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.checkpoint.tensors:
            raise MissingKeyError(f"{self.checkpoint.path}: no HF key {key!r} ({len(self)} keys; see .keys())")
        entry = self._entry(key)
        return LazyTensor(entry, self.reader, full_box(entry.shape), dtype=entry.dtype, device=torch.device("cpu"))

    def _entry(self, key: str) -> Entry:
        info = self.checkpoint.tensors[key]
        n = len(info.shape)
        return Entry(key, info.shape, info.dtype, (Source(info=info, start=(0,) * n, dims=tuple(range(n))),), _STORED)

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.tensors)

    def __len__(self) -> int:
        return len(self.checkpoint.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.checkpoint.tensors

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from disk so far (headers not counted)."""
        return self.checkpoint.bytes_read

    def close(self) -> None:
        """Release reader threads and file descriptors."""
        self.reader.close()
        self.checkpoint.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HFCheckpointView({str(self.checkpoint.path)!r}, {len(self)} tensors, {self.bytes_read} bytes read)"
