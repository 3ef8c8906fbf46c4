"""Block-scaled FP8 weights: the one decode step from stored FP8 bytes to float values.

DeepSeek-V3-style checkpoints store a 2-d weight ``K`` in FP8 next to ``K_scale_inv``, one
fp32 inverse scale per ``b0 x b1`` block of the weight (edge blocks may be ragged). A plan
source that carries :class:`BlockScales` is decoded while it is read: the read plan adds the
scale blocks a region touches (:meth:`BlockScales.region`) and the reader multiplies them in
(:func:`dequantize`). Nothing else in lazysd knows about the format.

Example:
    >>> import torch
    >>> part = torch.ones(3, 2, dtype=torch.float8_e4m3fn)  # columns 1..3 of a [3, 4] weight
    >>> s = torch.tensor([[2.0, 3.0]])                       # its scales, blocks of 4 x 2
    >>> dequantize(part, ((0, 3), (1, 3)), s, BlockScales(None, (4, 2)).region(((0, 3), (1, 3))), (4, 2))
    tensor([[2., 3.],
            [2., 3.],
            [2., 3.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import Box
from .header import TensorInfo

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class BlockScales:
    """The inverse block scales of one FP8 source tensor.

    Attributes:
        info: the scale tensor ``[ceil(rows / b0), ceil(cols / b1)]`` (a float dtype).
        block: ``(b0, b1)``: rows x cols of weight elements per scale.
    """

    info: TensorInfo
    block: tuple[int, int] = (128, 128)

    def region(self, sub: Box) -> Box:
        """The block rows/columns of the scales that weight rows/cols ``sub`` touch."""
        (b0, b1), ((r0, r1), (c0, c1)) = self.block, sub
        return ((r0 // b0, -(-r1 // b0)), (c0 // b1, -(-c1 // b1)))

    def mismatch(self, weight: TensorInfo) -> str | None:
        """What makes these scales unfit for ``weight``, or None when they fit."""
        expected = tuple(-(-n // b) for n, b in zip(weight.shape, self.block))
        scale = self.info
        if (
            weight.dtype not in FP8_DTYPES
            or len(weight.shape) != 2
            or scale.shape != expected
            or not scale.dtype.is_floating_point
        ):
            return (
                f"scales {list(scale.shape)} {scale.dtype} do not fit {weight.key} {list(weight.shape)} {weight.dtype} "
                f"({weight.file.name}): expected a 2-d FP8 weight and float scales {list(expected)} for "
                f"{self.block[0]}x{self.block[1]} blocks"
            )
        return None


def dequantize(
    data: torch.Tensor, sub: Box, scales: torch.Tensor, scale_box: Box, block: tuple[int, int]
) -> torch.Tensor:
    """FP8 rows/cols ``sub`` of a weight times their inverse block scales, in fp32.

    Args:
        data: the weight's region ``sub``, as read (FP8).
        scales: the scale blocks ``scale_box`` (:meth:`BlockScales.region` of ``sub``).
        block: ``(b0, b1)`` weight elements per scale.
    """
    (b0, b1), ((r0, r1), (c0, c1)), ((br, _), (bc, _)) = block, sub, scale_box
    # Each element's scale, picked by block index: the temporary is the region's own size,
    # whatever the block size says (a [2**24, 2**24] block must not expand to 2**48).
    rows = torch.arange(r0, r1) // b0 - br
    cols = torch.arange(c0, c1) // b1 - bc
    return data.float().mul_(scales.float()[rows][:, cols])
