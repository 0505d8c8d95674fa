"""The mixer interface every sequence mixer implements (see DESIGN.md, "The mixer interface")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lmkit.ops.flops import linear_flops


class Cache(Protocol):
    """Decoding state of one mixer layer; owned by the caller, one per layer."""

    length: int

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows (beam search, candidates of speculative decoding)."""

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (or raise if the state cannot)."""


@dataclass
class TreeStep:
    """A tree verification step (speculative decoding): N tree nodes continue the cached
    sequence at once. Node i sits at position `positions[i]` (cache length + depth) and sees
    the whole cache plus the nodes j with `mask[i, j]` (itself and its ancestors)."""

    positions: Tensor  # [N] absolute positions
    mask: Tensor  # [N, N] bool

    def attention_mask(self, offset: int) -> Tensor:
        """[N, offset + N] bool: every node sees the `offset` cached tokens and its ancestors
        (built once per step and shared by the layers)."""
        cached = getattr(self, "_cached", None)
        if cached is None or cached.shape[1] != offset + len(self.mask):
            seen = torch.ones(len(self.mask), offset, dtype=torch.bool, device=self.mask.device)
            cached = torch.cat([seen, self.mask], dim=1)
            self._cached = cached
        return cached


class Mixer(nn.Module):
    """Causal sequence mixer: [B, T, d_model] -> [B, T, d_model].

    `forward(x)` is the parallel (training) path. `forward(x, cache)` continues the sequence held in
    `cache` with T >= 1 new tokens and updates the cache; its outputs equal the parallel outputs.
    Mixers with `supports_tree = True` also take `forward(x, cache, tree=TreeStep)`: the new
    tokens form a tree of candidates verified in one pass, and their caches can `compact` to
    one path.
    """

    supports_tree = False

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

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token on a causal window of seq_len tokens: the projections (every
        nn.Linear inside) plus the token mixing (see lmkit.ops.flops for the conventions)."""
        return linear_flops(self) + self.mixing_flops(seq_len)

    def mixing_flops(self, seq_len: int) -> float:  # pragma: no cover
        """Forward FLOPs per token of the mixing itself (scores, state updates, scans)."""
        raise NotImplementedError(f"{type(self).__name__} does not count its FLOPs yet")


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
