"""Rotary position embedding (Su et al., 2021, RoFormer), applied to q and k inside mixers."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotates pairs of q/k channels by position-dependent angles theta_i = pos * base^(-2i/Dh).

    Uses the "rotate half" layout (channel i pairs with i + Dh/2). Angles are computed in float32
    for absolute positions `offset .. offset + T - 1`, so a cached decoding step sees the same
    rotation as the parallel forward.
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
        `positions` [T], e.g. a Medusa tree's cache length + node depth)."""
        T = x.shape[-2]
        if positions is None:
            pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)
        else:
            pos = positions.to(device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.to(x.device))  # [T, Dh/2]
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1)  # [T, Dh]
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1)  # [T, Dh]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)  # [B, H, T, Dh]
        return (x.float() * cos + rotated * sin).to(x.dtype)
