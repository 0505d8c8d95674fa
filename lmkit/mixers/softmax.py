"""Causal multi-head softmax attention with a KV cache (Vaswani et al., 2017)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.mixers.base import Mixer, TreeStep, check_heads, merge_heads, split_heads
from lmkit.mixers.tiled_attention import tiled_attention
from lmkit.ops.dropout import dropout as drop
from lmkit.ops.flops import mean_causal_keys
from lmkit.ops.rotary import RotaryEmbedding

BACKENDS = ("sdpa", "naive", "tiled")


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far; positions [0, length) of the buffers are valid."""

    k: Tensor  # [B, H, max_len, Dh]
    v: Tensor  # [B, H, max_len, Dh]
    length: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows."""
        self.k, self.v = self.k[rows], self.v[rows]

    def crop(self, length: int) -> None:
        """Forget every token after the first `length`; later writes overwrite the buffers."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to length={length}; the cache holds {self.length}")
        self.length = length

    def compact(self, start: int, keep: Tensor) -> None:
        """After a tree step written at [start, length): keep the entries start + keep (one
        root-to-node path, in order) at [start, start + len(keep)) and drop the rest."""
        src = start + keep.to(self.k.device)
        self.k[:, :, start : start + len(keep)] = self.k[:, :, src]
        self.v[:, :, start : start + len(keep)] = self.v[:, :, src]
        self.length = start + len(keep)


def causal_mask(Tq: int, Tk: int, device: torch.device | None = None) -> Tensor:
    """[Tq, Tk] boolean, True where query i may see key j: j <= i + (Tk - Tq) (bottom-right)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


# Below this many keys torch's bf16 CPU attention backward is slower than fp32's, so training runs
# SDPA in fp32 there; the no-grad forward stays in bf16, faster at any length (docs/throughput.md).
CPU_BF16_SDPA_MIN_KEYS = 160


def cpu_bf16_backward_is_slow(q: Tensor, num_keys: int) -> bool:
    """Whether attention over num_keys keys would meet the slow bf16 CPU backward."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and q.requires_grad
        and num_keys < CPU_BF16_SDPA_MIN_KEYS
    )


class SoftmaxAttention(Mixer):
    """Causal multi-head softmax attention.

    backend: "sdpa" (torch's fused kernel), "naive" (materialised T x T scores, the reference) or
    "tiled" (online softmax, O(T d) memory, see `tiled_attention`). `rotary`, if given, rotates q
    and k at their absolute positions. With a cache, new queries see every cached key (bottom-right
    causal mask).
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        backend: str = "sdpa",
        tile_size: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        check_heads(d_model, num_heads)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {list(BACKENDS)}")
        if tile_size < 1:
            raise ValueError(f"tile_size={tile_size} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if backend == "tiled" and dropout > 0:
            raise ValueError(
                f"dropout={dropout} is not supported by backend='tiled'; "
                "set dropout=0 or use backend='sdpa' or 'naive'"
            )
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.backend, self.tile_size, self.dropout = backend, tile_size, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # scaled at init by the model
        self.rotary = rotary

    supports_tree = True

    def forward(
        self, x: Tensor, cache: KVCache | None = None, tree: TreeStep | None = None
    ) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, T, D]
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # each [B, H, T, Dh]
        offset = 0 if cache is None else cache.length
        positions = None if tree is None else tree.positions
        if self.rotary is not None:
            q, k = self.rotary(q, offset, positions), self.rotary(k, offset, positions)
        if cache is not None:
            k, v = self._append(cache, k, v)  # [B, H, offset + T, Dh]
        if tree is not None:
            if cache is None:
                raise ValueError("a tree step continues a cached sequence; pass the cache")
            mask = tree.attention_mask(offset).to(q.device)  # [T, offset + T]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = self._attend(q, k, v)  # [B, H, T, Dh]
        return self.out_proj(merge_heads(y))  # [B, T, D]

    def _append(self, cache: KVCache, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values at [length, length + T) and return all valid ones."""
        B, _, T, _ = k.shape
        start, end = cache.length, cache.length + T
        if cache.k.shape[0] != B:
            raise ValueError(f"cache has batch size {cache.k.shape[0]}, input has {B}")
        if end > cache.max_len:
            raise ValueError(
                f"KV cache overflow: {start} cached + {T} new tokens exceed "
                f"max_len={cache.max_len}; create it with init_cache(batch_size, max_len>={end})"
            )
        cache.k[:, :, start:end] = k
        cache.v[:, :, start:end] = v
        cache.length = end
        # Under autocast the cache may be stored in another dtype than the activations.
        return cache.k[:, :, :end].to(k.dtype), cache.v[:, :, :end].to(v.dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [B, H, Tq, Dh], k, v: [B, H, Tk, Dh] -> [B, H, Tq, Dh], bottom-right causal."""
        Tq, Tk = q.shape[-2], k.shape[-2]
        dropout = self.dropout if self.training else 0.0
        if self.backend == "tiled":
            return tiled_attention(q, k, v, causal=True, tile_size=self.tile_size)
        if self.backend == "sdpa":
            # SDPA's is_causal is top-left aligned: right only for Tq == Tk; one query needs none.
            mask = None if Tq in (1, Tk) else causal_mask(Tq, Tk, q.device)
            is_causal = Tq == Tk and Tq > 1
            upcast = cpu_bf16_backward_is_slow(q, Tk)
            # fp32 outside autocast, which would cast the inputs straight back to bf16
            with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
                inputs = (t.float() for t in (q, k, v)) if upcast else (q, k, v)
                y = F.scaled_dot_product_attention(
                    *inputs, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
                )
            return y.to(q.dtype)
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(self.head_dim)  # [B,H,Tq,Tk]
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
        p = drop(scores.softmax(dim=-1), dropout, self.training)  # [B,H,Tq,Tk]
        return (p @ v.float()).to(q.dtype)  # [B, H, Tq, Dh]

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` rows and up to `max_len` tokens."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
        weight = self.qkv.weight
        shape = (batch_size, self.num_heads, max_len, self.head_dim)
        device, dtype = device or weight.device, dtype or weight.dtype
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
        )

    def state_size(self, seq_len: int) -> int:
        """Numbers held in the cache after seq_len tokens: keys and values of every head."""
        return 2 * self.num_heads * seq_len * self.head_dim

    def mixing_flops(self, seq_len: int) -> float:
        """q k^T and p v over the causal keys: 2 x 2 d per key, (T + 1) / 2 keys per query.
        The same for every backend (naive computes the masked half too; that is waste)."""
        return 4 * self.d_model * mean_causal_keys(seq_len)
