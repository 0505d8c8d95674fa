"""Dropout whose random mask is cheap to draw on CPU.

torch's CPU dropout draws one Bernoulli sample per element from a serial generator, a large
share of a small model's CPU training step; random integers come far cheaper per bit from the
same generator (timings in docs/throughput.md). So on CPU the mask is cut from random int32
words instead: two 15-bit uniforms per word (bits 0-14 and 16-30), an element kept when its
uniform is at or above round(p * 2^15).

Elements are still dropped independently, with probability p rounded to a multiple of 2^-15
(0.1 becomes 0.100006; at most 1 - 2^-15), and the kept ones are scaled by 1 / (1 - that p).
The scale is rounded to x's dtype, as torch's own dropout rounds it: in bf16 the expectation is
off by up to 0.2%, as with torch. The draw uses torch's default generator, so seeding and the
checkpointed RNG state cover it as they cover torch's dropout. Other devices use `F.dropout`:
CUDA draws its Philox samples in parallel, so there is nothing to gain there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LANE_BITS = 15  # a random_() int32 word holds 31 random bits: two 15-bit lanes
LANES = 1 << LANE_BITS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A boolean mask with each element False with probability `p` (a multiple of 2^-15, the
    nearest to p), and the scale 1 / (1 - that probability) for the kept elements."""
    drop_lanes = min(round(p * LANES), LANES - 1)  # p just below 1 would drop every lane
    n = shape.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_()  # [0, 2^31)
    # Lanes: bits 0-14 and bits 16-30. The high lane is words >> 16, so comparing it with the
    # threshold is comparing the word with threshold << 16: one pass, no shift.
    keep_low = (words & (LANES - 1)) >= drop_lanes
    keep_high = words >= drop_lanes << 16
    keep = torch.cat((keep_low, keep_high))[:n]
    return keep.view(shape), LANES / (LANES - drop_lanes)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout with the cheaper mask on CPU (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} must be in [0, 1)")
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    # One product with a {0, scale} mask in x's dtype: the cheapest forward and backward of the
    # forms timed (torch.where, x * keep * scale; docs/throughput.md).
    return x * keep.to(x.dtype).mul_(scale)


class Dropout(nn.Module):
    """nn.Dropout with the cheaper mask on CPU."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout={p} must be in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
