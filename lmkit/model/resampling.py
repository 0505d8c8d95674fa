"""Causal 1-D resampling of a sequence by a factor k: the hourglass model's shortening and
upsampling (Nawrot et al. 2021; the 1-D counterparts of pooling, nearest and PixelShuffle).

Causality: the sequence is shifted right by k - 1 before pooling, so short vector g summarises
the tokens at positions g k - k + 1 .. g k (zeros before the start) and serves positions
g k .. g k + k - 1 only. Without the shift, position g k would see up to k - 1 future tokens.

Every function takes a `ResampleState`: the position reached, the last k - 1 full-resolution
vectors and the upsampled vectors of the current group. Training passes a fresh state
(position 0); decoding keeps one per level in the caches, so a short vector is made once every
k tokens, when its last token (position g k) arrives, and serves the k - 1 tokens after it. One
code path for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.mixers.base import check_heads, merge_heads, split_heads
from lmkit.model.norms import build_norm

DOWNSAMPLING = ("mean", "linear")
UPSAMPLING = ("repeat", "linear", "attention")


@dataclass
class ResampleState:
    """Where one level of an hourglass stands in a sequence (see the module docstring)."""

    position: int = 0  # full-resolution tokens seen so far
    tail: Tensor | None = None  # [B, k - 1, D] the last k - 1 vectors before this call
    last_group: Tensor | None = None  # [B, k, D] the upsampled vectors of the current group
    keys: Tensor | None = None  # attention upsampling: [B, H, g, Dh] of every short vector
    values: Tensor | None = None


class Shorten(nn.Module):
    """Shift right by k - 1, then pool every k vectors: `mean` (average pooling) or `linear`
    (concatenate the k vectors, project k D -> D)."""

    def __init__(self, d_model: int, factor: int, method: str = "linear") -> None:
        super().__init__()
        if method not in DOWNSAMPLING:
            raise ValueError(f"model.downsample={method!r}; choose one of {list(DOWNSAMPLING)}")
        self.factor, self.method = factor, method
        self.proj = nn.Linear(factor * d_model, d_model) if method == "linear" else None

    def forward(self, x: Tensor, state: ResampleState) -> Tensor:
        """x: [B, T, D] at positions p .. p + T - 1 -> the short vectors completed by them,
        [B, n, D] for every g with p <= g k <= p + T - 1 (n may be 0)."""
        B, T, D = x.shape
        k, p = self.factor, state.position
        tail = state.tail if state.tail is not None else x.new_zeros(B, k - 1, D)
        full = torch.cat([tail, x], dim=1)  # positions p - k + 1 .. p + T - 1
        state.tail = full[:, full.shape[1] - (k - 1) :]
        first, last = -(-p // k), (p + T - 1) // k
        n = max(0, last - first + 1)
        start = first * k - p  # index in `full` of position first k - k + 1
        windows = full[:, start : start + n * k].reshape(B, n, k, D)
        if self.method == "mean":
            return windows.mean(dim=2)
        return self.proj(windows.reshape(B, n, k * D))

    def flops_per_token(self) -> float:
        """Per full-resolution token: the k D x D projection runs once per k tokens."""
        return (
            0.0
            if self.proj is None
            else 2 * self.proj.in_features * self.proj.out_features / self.factor
        )


class Upsample(nn.Module):
    """Short vectors back to full resolution, plus the residual from before the shortening.

    repeat: each short vector serves its k positions (nearest neighbour). linear: project
    D -> k D and give each of the k positions its own slice (the 1-D PixelShuffle). attention:
    the repeated vectors plus the residual are queries that attend causally to every short
    vector so far (position p sees g <= p // k), added on as a residual.
    """

    def __init__(
        self,
        d_model: int,
        factor: int,
        method: str = "linear",
        *,
        num_heads: int = 4,
        norm: str = "layernorm",
    ) -> None:
        super().__init__()
        if method not in UPSAMPLING:
            raise ValueError(f"model.upsample={method!r}; choose one of {list(UPSAMPLING)}")
        self.factor, self.method, self.d_model = factor, method, d_model
        self.proj = nn.Linear(d_model, factor * d_model) if method == "linear" else None
        if method == "attention":
            check_heads(d_model, num_heads)
            self.num_heads = num_heads
            self.query_norm, self.key_norm = build_norm(norm, d_model), build_norm(norm, d_model)
            self.q_proj = nn.Linear(d_model, d_model, bias=False)
            self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
            self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, residual: Tensor, short: Tensor, state: ResampleState) -> Tensor:
        """residual: [B, T, D] at positions p .. p + T - 1; short: the [B, n, D] outputs of the
        short vectors Shorten made from it -> [B, T, D]. Advances state.position by T."""
        B, T, D = residual.shape
        k, p = self.factor, state.position
        # k vectors per new short vector, each made once
        if self.method == "linear":
            per_position = self.proj(short).view(B, -1, D)  # [B, k n, D], the 1-D PixelShuffle
        else:
            per_position = short.repeat_interleave(k, dim=1)  # [B, k n, D]
        if p % k:  # p continues the group of an earlier short vector: its k vectors come first
            per_position = torch.cat([state.last_group, per_position], dim=1)
        offset = p % k  # per_position starts at position p - p % k
        up = per_position[:, offset : offset + T] + residual
        if self.method == "attention":
            up = up + self._attend(up, short, state)
        state.last_group = per_position[:, per_position.shape[1] - k :]
        state.position = p + T
        return up

    def _attend(self, up: Tensor, short: Tensor, state: ResampleState) -> Tensor:
        if short.shape[1]:  # the short vectors completed by this call join the keys
            k_new, v_new = (
                split_heads(t, self.num_heads)  # [B, H, n, Dh]
                for t in self.kv_proj(self.key_norm(short)).chunk(2, dim=-1)
            )
            first = state.keys is None
            state.keys = k_new if first else torch.cat([state.keys, k_new], dim=2)
            state.values = v_new if first else torch.cat([state.values, v_new], dim=2)
        keys, values = state.keys, state.values
        T, G = up.shape[1], keys.shape[2]
        positions = torch.arange(state.position, state.position + T, device=up.device)
        visible = torch.arange(G, device=up.device)[None, :] <= (positions // self.factor)[:, None]
        q = split_heads(self.q_proj(self.query_norm(up)), self.num_heads)  # [B, H, T, Dh]
        y = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible
        )
        return self.o_proj(merge_heads(y))

    def flops_per_token(self, seq_len: int) -> float:
        """Per full-resolution token of a window of seq_len: the linear projection once per k
        tokens; attention: q and o per token, k and v per short vector, scores and values over
        the (p // k + 1) short vectors position p sees."""
        D, k = self.d_model, self.factor
        if self.method == "linear":
            return 2 * D * k * D / k
        if self.method == "repeat":
            return 0.0
        keys = sum(p // k + 1 for p in range(seq_len)) / seq_len
        return 2 * 2 * D * D + 2 * 2 * D * D / k + 4 * D * keys
