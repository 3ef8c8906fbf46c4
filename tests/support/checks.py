"""Bitwise comparisons for tests: raw bytes, so NaN payloads and -0.0 compare exactly.

Example:
    >>> import torch
    >>> same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # equal values, different bits
    False
    >>> assert_bitwise_equal({"w": torch.ones(2)}, {"w": torch.ones(2)})
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["assert_bitwise_equal", "bits", "same_bits", "tensor_bytes"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` in row-major order, as a flat uint8 tensor."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` in row-major order, as ``bytes``."""
    return bits(t).numpy().tobytes()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape, same bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_bitwise_equal(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    """The same keys (in the same order, or as a set) and, per key, the same dtype, shape and bytes."""
    assert list(got) == list(want) or set(got) == set(want)
    for key, t in want.items():
        assert got[key].dtype == t.dtype, key
        assert got[key].shape == t.shape, key
        assert torch.equal(bits(got[key]), bits(t)), key
