"""Synthetic Step3p5 checkpoints on disk, with the real key names, orientations and dtypes.

Writes a ``config.json`` plus safetensors weights in the Hugging Face layout of Step-3.5-Flash
(documented in :mod:`lazysd.adapters.step3p5`): grouped experts ``moe.{gate,up}_proj.weight`` [E, I, D] and
``moe.down_proj.weight`` [E, D, I], an fp32 ``moe.router_bias``, zero-centred norms, MTP layers
after the main ones. Tensors are generated and written one slice at a time, so a checkpoint of
any size needs only a few tens of MB of memory, and ``sparse=True`` writes headers only.

Shape legend: E experts, D hidden, I expert intermediate, S shared-expert intermediate,
V vocabulary, nh query heads of the layer, hd head dim.

Example:
    >>> import tempfile
    >>> spec = Step3p5Spec.tiny()
    >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
    >>> ckpt = make_checkpoint(tmp.name, spec, layout="split")
    >>> tensors = load_hf_tensors(ckpt)
    >>> tensors["model.layers.1.moe.gate_proj.weight"].shape
    torch.Size([8, 16, 32])
    >>> tensors["model.layers.1.moe.router_bias"].dtype
    torch.float32
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

import torch

from lazysd.testing.step3p5 import Entry, Step3p5Spec, checkpoint_nbytes, config_dict, hf_tensor_specs
from lazysd.writer import SafetensorsWriter

__all__ = ["INDEX_NAME", "SINGLE_NAME", "ensure_checkpoint", "load_hf_tensors", "make_checkpoint"]

Layout = Literal["single", "sharded", "split"]

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# Generation works on slices of about this many elements (32 MiB of bf16), so memory stays flat
# however large a tensor is, and each slice goes straight to disk via a byte_offset write.
_CHUNK_ELEMS = 1 << 24
# Hugging Face's default max shard size; shards smaller than this are used for tiny checkpoints.
_MAX_DEFAULT_SHARD_BYTES = 5 * 10**9


def _plan_shards(entries: list[Entry], layout: Layout, shard_bytes: int) -> list[list[Entry]]:
    """Pack entries in order into shards of at most ``shard_bytes`` (a bigger tensor sits alone).

    ``split`` also starts a new shard at every MoE ``up_proj`` and ``down_proj``, so a layer's
    gate, up and down tensors are in three different files.
    """
    if layout == "single":
        return [entries]
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        key, dtype, shape = entry
        nbytes = dtype.itemsize * math.prod(shape)
        forced = layout == "split" and key.endswith(("moe.up_proj.weight", "moe.down_proj.weight"))
        if shards[-1] and (forced or size + nbytes > shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _random_bf16(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` bf16 values with random sign and mantissa and magnitude in [2**-7, 2**-4).

    Drawing 64 random bits per 4 values and fixing the exponent bits is ~2.5x faster than
    ``normal_`` on bf16, which matters for multi-GB benchmark checkpoints; std is ~0.034.
    """
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator)
    bits16 = bits.view(torch.int16)[:n]
    # Keep the sign, the two lowest exponent bits and the 7 mantissa bits; fix the rest of the
    # exponent so every value is finite and small (biased exponent 120..123).
    bits16.bitwise_and_(0x817F - 0x10000).bitwise_or_(0x3C00)
    return bits16.view(torch.bfloat16)


def _random_chunk(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return _random_bf16(n, generator)
    # fp32 here is the router bias: keep it small so it nudges routing rather than decides it.
    return torch.empty(n, dtype=torch.float32).normal_(0.0, 1e-3, generator=generator).to(dtype)


def _fill(writer: SafetensorsWriter, entry: Entry, generator: torch.Generator) -> None:
    key, dtype, shape = entry
    if math.prod(shape) == 0 or not shape:
        n = math.prod(shape)
        writer.write(key, _random_chunk(n, dtype, generator).reshape(shape))
        return
    row = math.prod(shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMS // max(row, 1))
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        chunk = _random_chunk(rows * row, dtype, generator).reshape(rows, *shape[1:])
        writer.write(key, chunk, byte_offset=start * row * dtype.itemsize)


def make_checkpoint(
    path: str | os.PathLike[str],
    spec: Step3p5Spec,
    *,
    layout: Layout = "sharded",
    shard_bytes: int | None = None,
    seed: int = 0,
    sparse: bool = False,
) -> Path:
    """Write a synthetic HF Step3p5 checkpoint (config.json + safetensors) into ``path``.

    Args:
        path: directory to create or fill; it must not hold safetensors weights yet.
        spec: model sizes.
        layout: ``"single"`` writes ``model.safetensors``; ``"sharded"`` packs tensors in order
            into ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``;
            ``"split"`` is sharded with each MoE layer's gate, up and down tensors in three
            different files.
        shard_bytes: shard size limit; default: a quarter of the checkpoint (so small test
            checkpoints still have several shards), at most 5 GB.
        seed: values come from ``torch.Generator().manual_seed(seed)``, drawn in key order, so
            they are the same for every layout and shard size.
        sparse: write headers only; data is file holes (reads as zeros, costs no disk), e.g.
            for the ~400 GB Flash key space in under a second.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> import tempfile
        >>> tmp = tempfile.TemporaryDirectory()  # removed when the example ends
        >>> ckpt = make_checkpoint(tmp.name, Step3p5Spec.flash(), sparse=True)
        >>> len(list(ckpt.glob("model-*.safetensors")))
        128
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if any(path.glob("*.safetensors")) or (path / INDEX_NAME).exists():
        raise FileExistsError(f"{path} already holds safetensors weights; use an empty directory")
    if layout not in ("single", "sharded", "split"):
        raise ValueError(f"layout must be 'single', 'sharded' or 'split', got {layout!r}")
    entries = hf_tensor_specs(spec)
    total = sum(d.itemsize * math.prod(s) for _, d, s in entries)
    if shard_bytes is None:
        shard_bytes = min(_MAX_DEFAULT_SHARD_BYTES, max(1, math.ceil(total / 4)))
    (path / "config.json").write_text(json.dumps(config_dict(spec), indent=2) + "\n")

    shards = _plan_shards(entries, layout, shard_bytes)
    if layout == "single":
        names = [SINGLE_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards):
        with SafetensorsWriter(path / name, shard, metadata={"format": "pt"}, sparse=sparse) as writer:
            for entry in shard:
                if not sparse:
                    _fill(writer, entry, generator)
                weight_map[entry[0]] = name
    if layout != "single":
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return path


def load_hf_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Eagerly read every tensor of a checkpoint directory (or one file) with ``safetensors``.

    The reference reader for tests: it follows ``model.safetensors.index.json`` when present,
    else reads every ``*.safetensors`` file in the directory.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX_NAME).exists():
        weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(file))
    return out


def ensure_checkpoint(
    path: str | os.PathLike[str], spec: Step3p5Spec, *, layout: Layout = "sharded", verbose: bool = False
) -> Path:
    """A sharded checkpoint at ``path``, generated only if it is not complete there already.

    The index is written last, so a directory holding it is reused as it is; anything else
    (nothing, or what an interrupted run left) is removed and generated anew. ``verbose``
    reports a generation on stderr.
    """
    path = Path(path)
    if layout == "single":
        raise ValueError("ensure_checkpoint needs an index to tell a complete checkpoint: use 'sharded' or 'split'")
    if (path / INDEX_NAME).exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    make_checkpoint(path, spec, layout=layout)
    if verbose:
        print(
            f"generated {path} ({checkpoint_nbytes(spec) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    return path
