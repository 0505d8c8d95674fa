"""The mixer interface every sequence mixer implements (see DESIGN.md, "The mixer interface")."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class Cache(Protocol):
    """Decoding state of one mixer layer; owned by the caller, one per layer."""

    length: int

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows (beam search, Medusa candidates)."""

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (or raise if the state cannot)."""


class Mixer(nn.Module):
    """Causal sequence mixer: [B, T, d_model] -> [B, T, d_model].

    `forward(x)` is the parallel (training) path. `forward(x, cache)` continues the sequence held in
    `cache` with T >= 1 new tokens and updates the cache; its outputs equal the parallel outputs.
    """

    def __init__(self, d_model: int, *, layer_idx: int | None = None) -> None:
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model={d_model} must be positive")
        self.d_model, self.layer_idx = d_model, layer_idx

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Cache:  # pragma: no cover - every concrete mixer overrides it
        raise NotImplementedError(f"{type(self).__name__} has no incremental decoding yet")

    def state_size(self, seq_len: int) -> int:  # pragma: no cover
        """Numbers held in the cache after seq_len tokens (for reports)."""
        raise NotImplementedError


def check_heads(d_model: int, num_heads: int) -> int:
    """The head width d_model // num_heads; a clear error when the heads do not divide it."""
    if num_heads < 1 or d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    return d_model // num_heads


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, T, H * Dh] -> [B, H, T, Dh]."""
    B, T, _ = x.shape
    return x.view(B, T, num_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, Dh] -> [B, T, H * Dh]."""
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)
