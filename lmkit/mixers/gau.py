"""Gated attention unit and its mixed-chunk form (Hua, Dai, Liu, Le, 2022, "Transformer Quality in
Linear Time"; the paper's FLASH model, named `gau_chunked` here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.mixers.base import Mixer
from lmkit.ops.flops import mean_causal_keys
from lmkit.ops.rotary import RotaryEmbedding


@dataclass
class GAUCache:
    """Quadratic GAU: rotated keys and values; positions [0, length) of the buffers are valid."""

    k: Tensor  # [B, max_len, s]
    v: Tensor  # [B, max_len, e]
    length: int = 0

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows."""
        self.k, self.v = self.k[rows], self.v[rows]

    def crop(self, length: int) -> None:
        """Forget every token after the first `length`; later writes overwrite the buffers."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to length={length}; the cache holds {self.length}")
        self.length = length


@dataclass
class GAUChunkCache:
    """Mixed-chunk GAU: the linear state of the chunks before `folded` plus the keys and values of
    the current chunk (tokens [folded, length), at most chunk_size of them)."""

    state: Tensor  # [B, s, e] float32, sum over folded tokens of k_lin^T v
    k_quad: Tensor  # [B, C, s]
    k_lin: Tensor  # [B, C, s]
    v: Tensor  # [B, C, e]
    length: int = 0
    folded: int = 0  # tokens summed into `state`, a multiple of the chunk size

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows."""
        self.state, self.v = self.state[rows], self.v[rows]
        self.k_quad, self.k_lin = self.k_quad[rows], self.k_lin[rows]

    def crop(self, length: int) -> None:
        """Forget tokens after the first `length`; only within the current chunk (the linear state
        cannot go back in time)."""
        if not self.folded <= length <= self.length:
            raise ValueError(
                f"cannot crop to length={length}: the cache goes back only to the start of its "
                f"current chunk ({self.folded}) and holds {self.length}; snapshot it to roll back"
            )
        self.length = length


def relu2_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: [..., Tq, s], k: [..., Tk, s], v: [..., Tk, e] -> [..., Tq, e].

    Row i is the mean over the keys it sees (j <= i + Tk - Tq, bottom-right causal) of
    relu(q_i . k_j)^2 v_j: the sum divided by the count Tk - Tq + i + 1.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = torch.relu(q @ k.transpose(-1, -2)).square().tril(Tk - Tq)  # [..., Tq, Tk]
    count = torch.arange(Tk - Tq + 1, Tk + 1, device=q.device, dtype=torch.float32)  # [Tq]
    return (scores @ v) / count[:, None]  # [..., Tq, e]


class GAU(Mixer):
    """Gated attention unit (one head): y = (U * A V) W_o with U = silu(x W_u), V = silu(x W_v),
    shared Z = silu(x W_z) and Q, K = Z * gamma + beta, A = relu(Q K^T)^2 causal.

    expand: U, V width e = expand * d_model. qk_dim: width s of Z (None: min(128, d_model / 4),
    even). chunk_size: None for the quadratic GAU; G for the mixed-chunk form: relu^2 attention
    within each chunk of G tokens plus causal linear attention Q_lin (sum over earlier chunks of
    K_lin^T V), linear in T. `rotary` (any width) rotates all q/k at their absolute positions.

    Normaliser: the paper scales scores by 1/T, the sequence length (pseudocode: relu(QK^T/T)^2),
    so outputs depend on the length trained at and a cached decoder must pick some T. Here each
    part is the *mean* over the keys the query sees: sum_j relu(q_i . k_j)^2 v_j / (i + 1) (in a
    chunk, i counts from the chunk start) and the linear part over the tokens of earlier chunks.
    On the last row of a window this is the (1/T) relu^2 scaling; it needs no length constant, is
    the same in training and in cached decoding at any length, and one chunk covering the
    sequence equals the quadratic GAU.
    """

    def __init__(
        self,
        d_model: int,
        *,
        expand: float = 2.0,
        qk_dim: int | None = None,
        chunk_size: int | None = None,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        if expand <= 0 or int(expand * d_model) < 1:
            raise ValueError(f"expand={expand} must be positive (value width = expand * d_model)")
        if qk_dim is None:
            qk_dim = 2 * max(1, min(64, d_model // 8))
        if qk_dim < 1:
            raise ValueError(f"qk_dim={qk_dim} must be >= 1")
        if rotary is not None and qk_dim % 2:
            raise ValueError(f"qk_dim={qk_dim} must be even to apply rotary embeddings")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (or null for quadratic GAU)")
        self.expand, self.qk_dim, self.chunk_size = expand, qk_dim, chunk_size
        self.value_dim = int(expand * d_model)
        self.in_proj = nn.Linear(d_model, 2 * self.value_dim + qk_dim, bias=bias)  # U, V, Z
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=bias)  # scaled at init by the model
        # Per-dim scale and offset of Z: q, k (quadratic); q_quad, k_quad, q_lin, k_lin (chunked).
        # Initialised like LayerNorm's affine (1, 0), not N(0, 0.02) as in the paper's code: with
        # GPT-2-sized Z, relu^2 scores then start near zero (degree 4 in gamma) and a short run
        # barely learns (docs/mixers.md).
        num_qk = 2 if chunk_size is None else 4
        self.gamma = nn.Parameter(torch.ones(num_qk, qk_dim))
        self.beta = nn.Parameter(torch.zeros(num_qk, qk_dim))
        self.gamma._no_weight_decay = self.beta._no_weight_decay = True
        if rotary is not None and rotary.head_dim != qk_dim:
            rotary = RotaryEmbedding(qk_dim, base=rotary.base)
        self.rotary = rotary

    def forward(self, x: Tensor, cache: GAUCache | GAUChunkCache | None = None) -> Tensor:
        offset = 0 if cache is None else cache.length
        u, v, qk = self._project(x, offset)
        if self.chunk_size is None:
            q, k = qk
            if cache is not None:
                k, v = self._append(cache, k, v)  # [B, offset + T, s], [B, offset + T, e]
            y = relu2_attention(q, k, v)  # [B, T, e]
        elif cache is None:
            y = self._mixed_chunk(*qk, v)  # [B, T, e]
        else:
            y = self._mixed_chunk_cached(*qk, v, cache)  # [B, T, e]
        return self.out_proj(u * y.to(u.dtype))  # [B, T, D]

    def _project(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        e, s = self.value_dim, self.qk_dim
        h = F.silu(self.in_proj(x))  # [B, T, 2e + s]
        u, v, z = h.split([e, e, s], dim=-1)  # [B, T, e], [B, T, e], [B, T, s]
        qk = z.unsqueeze(1) * self.gamma[:, None] + self.beta[:, None]  # [B, 2 or 4, T, s]
        if self.rotary is not None:
            qk = self.rotary(qk, offset)
        return u, v, qk.unbind(1)

    def _append(self, cache: GAUCache, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new keys/values at [length, length + T) and return all valid ones."""
        self._check_cache(cache, GAUCache, k.shape[0])
        start, end = cache.length, cache.length + k.shape[1]
        if end > cache.k.shape[1]:
            raise ValueError(
                f"GAU cache overflow: {start} cached + {k.shape[1]} new tokens exceed "
                f"max_len={cache.k.shape[1]}; create it with init_cache(batch_size, max_len>={end})"
            )
        cache.k[:, start:end], cache.v[:, start:end] = k, v
        cache.length = end
        return cache.k[:, :end].to(k.dtype), cache.v[:, :end].to(v.dtype)

    def _check_cache(self, cache: GAUCache | GAUChunkCache, kind: type, batch_size: int) -> None:
        if not isinstance(cache, kind):
            raise TypeError(
                f"{type(cache).__name__} given; this GAU decodes with a {kind.__name__}"
            )
        if cache.v.shape[0] != batch_size:
            raise ValueError(f"cache has batch size {cache.v.shape[0]}, input has {batch_size}")

    def _mixed_chunk(self, qq: Tensor, kq: Tensor, ql: Tensor, kl: Tensor, v: Tensor) -> Tensor:
        """Parallel mixed-chunk attention over chunks [gC, (g+1)C) -> [B, T, e]."""
        B, T, _ = qq.shape
        C = min(self.chunk_size, T)
        G = -(-T // C)
        pad = G * C - T  # zero rows at the end: they follow every real query, so never seen
        qq, kq, ql, kl, v = (
            F.pad(t, (0, 0, 0, pad)).view(B, G, C, -1) for t in (qq, kq, ql, kl, v)
        )
        local = relu2_attention(qq, kq, v)  # [B, G, C, e]
        kv = (kl.transpose(-1, -2) @ v).float()  # [B, G, s, e], each chunk's K_lin^T V
        # Exclusive prefix over chunks: the current chunk is the quadratic part's (no double count).
        prefix = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1].cumsum(1)], 1)  # [B, G, s, e]
        before = (torch.arange(G, device=v.device, dtype=torch.float32) * C).clamp(min=1)  # [G]
        lin = (ql.float() @ prefix) / before[:, None, None]  # [B, G, C, e]
        return (local + lin).view(B, G * C, -1)[:, :T]  # [B, T, e]

    def _mixed_chunk_cached(
        self, qq: Tensor, kq: Tensor, ql: Tensor, kl: Tensor, v: Tensor, cache: GAUChunkCache
    ) -> Tensor:
        """Continue the cached sequence, one piece per chunk the new tokens touch -> [B, T, e]."""
        self._check_cache(cache, GAUChunkCache, v.shape[0])
        C, T, out, pos = self.chunk_size, v.shape[1], [], 0
        while pos < T:
            if cache.length - cache.folded == C:  # chunk complete: fold it into the linear state
                fold = (cache.k_lin.transpose(-1, -2) @ cache.v).float()  # [B, s, e]
                cache.state = cache.state + fold
                cache.folded += C
            start = cache.length - cache.folded  # where the piece goes in the chunk buffers
            n = min(T - pos, C - start)
            piece, end = slice(pos, pos + n), start + n
            cache.k_quad[:, start:end], cache.k_lin[:, start:end] = kq[:, piece], kl[:, piece]
            cache.v[:, start:end] = v[:, piece]
            k_chunk = cache.k_quad[:, :end].to(kq.dtype)  # [B, end, s], the chunk so far
            y = relu2_attention(qq[:, piece], k_chunk, cache.v[:, :end].to(v.dtype))  # [B, n, e]
            if cache.folded:
                y = y + (ql[:, piece].float() @ cache.state) / cache.folded  # [B, n, e]
            out.append(y)
            cache.length += n
            pos += n
        return torch.cat(out, 1)  # [B, T, e]

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> GAUCache | GAUChunkCache:
        """An empty cache for `batch_size` rows: up to `max_len` tokens for the quadratic GAU, any
        number for the chunked form (its buffers hold one chunk)."""
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
        weight = self.in_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        B, s, e = batch_size, self.qk_dim, self.value_dim
        if self.chunk_size is None:
            return GAUCache(
                k=torch.zeros(B, max_len, s, device=device, dtype=dtype),
                v=torch.zeros(B, max_len, e, device=device, dtype=dtype),
            )
        C = self.chunk_size
        return GAUChunkCache(
            state=torch.zeros(B, s, e, device=device, dtype=torch.float32),
            k_quad=torch.zeros(B, C, s, device=device, dtype=dtype),
            k_lin=torch.zeros(B, C, s, device=device, dtype=dtype),
            v=torch.zeros(B, C, e, device=device, dtype=dtype),
        )

    def mixing_flops(self, seq_len: int) -> float:
        """relu^2 attention over the causal keys: 2 (s + e) per key, (T + 1) / 2 keys per query
        (within a chunk of C for the mixed-chunk form, which adds K_lin^T V to the state and
        Q_lin times the state: 2 s e each per token)."""
        s, e = self.qk_dim, self.value_dim
        if self.chunk_size is None:
            return 2 * (s + e) * mean_causal_keys(seq_len)
        local = 2 * (s + e) * mean_causal_keys(min(self.chunk_size, seq_len))
        return local + 4 * s * e

    def state_size(self, seq_len: int) -> int:
        """Numbers held in the cache after seq_len tokens: keys and values of every token
        (quadratic), or the linear state plus the current chunk's two keys and value (chunked)."""
        s, e = self.qk_dim, self.value_dim
        if self.chunk_size is None:
            return seq_len * (s + e)
        in_chunk = (seq_len - 1) % self.chunk_size + 1 if seq_len else 0
        return s * e + in_chunk * (2 * s + e)
