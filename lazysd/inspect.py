"""Metadata-only views of a VirtualStateDict: summaries and key tables. Never reads tensor data."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .virtual import VirtualStateDict


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def dtype_name(dtype: object) -> str:
    return str(dtype).removeprefix("torch.")


def summary_lines(vsd: VirtualStateDict) -> list[str]:
    """Family, path, key count, parameters, bytes and dtype mix."""
    entries = vsd.plan.entries.values()
    params = sum(e.numel for e in entries)
    nbytes = sum(e.numel * vsd.dtype_of(e).itemsize for e in entries)
    mix = Counter()
    for e in entries:
        mix[dtype_name(vsd.dtype_of(e))] += e.numel * vsd.dtype_of(e).itemsize
    mix_text = ", ".join(f"{d} {100 * b / max(nbytes, 1):.1f}%" for d, b in mix.most_common())
    lines = [
        f"VirtualStateDict(family={vsd.adapter.name!r}, path={str(vsd.checkpoint.path)!r})",
        f"  {len(vsd)} native keys from {len(vsd.checkpoint.tensors)} HF tensors in {len(vsd.checkpoint.files)} file(s)",
        f"  {params:,} parameters, {human_bytes(nbytes)} ({mix_text})",
    ]
    if vsd.plan.ignored:
        lines.append(f"  {len(vsd.plan.ignored)} HF tensors not exposed (e.g. MTP layers; include_mtp=True shows them)")
    return lines


def key_table(vsd: VirtualStateDict, limit: int | None = 20) -> list[str]:
    """One line per native key: shape, dtype, bytes, HF sources; at most ``limit`` lines + '... K more'."""
    keys = list(vsd)
    shown = keys if limit is None else keys[:limit]
    width = max((len(k) for k in shown), default=0)
    lines = []
    for key in shown:
        e = vsd.plan.entries[key]
        srcs = e.hf_keys
        src_text = srcs[0] if len(srcs) == 1 else f"{srcs[0]} + {len(srcs) - 1} more"
        if srcs == (key,):
            src_text = "(same key)"
        dtype = vsd.dtype_of(e)
        lines.append(
            f"{key:<{width}}  {str(list(e.shape)):<18} {dtype_name(dtype):<9} {human_bytes(e.numel * dtype.itemsize):>10}  <- {src_text}"
        )
    if limit is not None and len(keys) > limit:
        lines.append(f"... {len(keys) - limit} more")
    return lines


def summary_text(vsd: VirtualStateDict, limit: int = 8) -> str:
    return "\n".join(summary_lines(vsd) + ["  " + line for line in key_table(vsd, limit)])
