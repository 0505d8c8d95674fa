"""Rotary position embedding (Su et al., 2021, RoFormer), applied to q and k inside mixers."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotates pairs of q/k channels by position-dependent angles theta_i = pos * base^(-2i/Dh).

    Uses the "rotate half" layout (channel i pairs with i + Dh/2). Angles are computed in float32
    for absolute positions `offset .. offset + T - 1`, so a cached decoding step sees the same
    rotation as the parallel forward; the rotation itself runs in x's dtype.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, base
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [Dh/2]

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """x: [B, H, T, Dh] -> same shape, rotated for positions offset .. offset+T-1 (or for
        `positions` [T], e.g. a candidate tree's cache length + node depth)."""
        T = x.shape[-2]
        if positions is None:
            pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
        else:
            pos = positions.to(device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.to(x.device))  # [T, Dh/2]
        # The rotation runs in x's dtype, as in most LLM code: in bf16 that adds about one bf16
        # rounding to q and k and is cheaper than a float32 round trip (docs/throughput.md).
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # each [T, Dh/2]
        x1, x2 = x.chunk(2, dim=-1)  # each [B, H, T, Dh/2]
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) on the halves: no rotated copy of x
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
