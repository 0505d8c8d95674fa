"""Causal linear attention, "Transformers are RNNs" (Katharopoulos et al., 2020).

y_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) with S_i = sum_{j<=i} phi(k_j) v_j^T and
z_i = sum_{j<=i} phi(k_j). Three computations of the same function (ALGORITHMS.md section 2):
`quadratic_form` (masked T x T reference), `chunk_form` (chunkwise parallel, for training) and
`recurrent_form` (one token at a time, for decoding). Each returns the unnormalised numerator and
the final state; the denominator is the same computation with an all-ones value column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.mixers.base import Mixer, check_heads, merge_heads, split_heads
from lmkit.mixers.feature_maps import FEATURE_MAPS
from lmkit.ops.flops import mean_causal_keys
from lmkit.ops.rotary import RotaryEmbedding

MODES = ("chunk", "quadratic", "recurrent")


@dataclass
class LinearCache:
    """Constant-size decoding state: it does not grow with the number of tokens seen."""

    state: Tensor  # [B, H, Dk, Dv] float32, running sum of phi(k) v^T
    norm: Tensor  # [B, H, Dk]     float32, running sum of phi(k)
    length: int = 0

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows."""
        self.state, self.norm = self.state[rows], self.norm[rows]

    def crop(self, length: int) -> None:
        """A recurrent state cannot go back in time; only the current length is accepted."""
        if length != self.length:
            raise ValueError(
                f"LinearCache holds a running sum of {self.length} tokens and cannot be cropped "
                f"to length={length}; snapshot the cache (copy.deepcopy) before verifying"
            )


def quadratic_form(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Reference: (q k^T masked causally) v + q S0. q, k: [B, H, T, Dk], v: [B, H, T, Dv],
    state S0: [B, H, Dk, Dv] or None (zeros) -> (y [B, H, T, Dv], final state [B, H, Dk, Dv])."""
    scores = (q @ k.transpose(-1, -2)).tril()  # [B, H, T, T], zero above the diagonal
    y = scores @ v  # [B, H, T, Dv]
    new_state = k.transpose(-1, -2) @ v  # [B, H, Dk, Dv]
    if state is not None:
        y, new_state = y + q @ state, new_state + state
    return y, new_state


def recurrent_form(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """S_t = S_{t-1} + k_t v_t^T, y_t = q_t^T S_t, one token at a time (shapes: quadratic_form)."""
    B, H, T, Dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    ys = []
    for t in range(T):
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]  # [B, H, Dk, Dv]
        ys.append(q[:, :, t, None, :] @ state)  # [B, H, 1, Dv]
    return torch.cat(ys, dim=2), state


def chunk_form(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None = None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Chunkwise parallel: the masked quadratic form inside each chunk of C tokens, plus
    q_c S_{c-1} with S_{c-1} the state before the chunk. O(T C d + T d^2) time; the per-chunk
    states [B, H, T/C, Dk, Dv] are the only state memory (no T x Dk x Dv cumsum)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)  # number of chunks
    pad = N * C - T
    if pad:  # zero keys and values add nothing to any state; padded query rows are dropped
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc, kc, vc = (t.reshape(B, H, N, C, -1) for t in (q, k, v))  # [B, H, N, C, Dk or Dv]
    scores = (qc @ kc.transpose(-1, -2)).tril()  # [B, H, N, C, C], causal inside the chunk
    y = scores @ vc  # [B, H, N, C, Dv]
    chunk_states = kc.transpose(-1, -2) @ vc  # [B, H, N, Dk, Dv], sum of k v^T per chunk
    states = chunk_states.cumsum(dim=2)  # [B, H, N, Dk, Dv], inclusive prefix over chunks
    if state is None:
        start = states.new_zeros(B, H, 1, Dk, Dv)
    else:
        start = state.unsqueeze(2)  # [B, H, 1, Dk, Dv]
        states = states + start
    before = torch.cat([start, states[:, :, :-1]], dim=2)  # [B, H, N, Dk, Dv], state entering c
    y = y + qc @ before  # [B, H, N, C, Dv]
    return y.reshape(B, H, N * C, Dv)[:, :, :T], states[:, :, -1]


class LinearAttention(Mixer):
    """Causal multi-head linear attention (Katharopoulos et al., 2020).

    feature_map: elu (elu+1, default), relu, identity (needs normalize=False) or taylor (Based's
    1 + d + d^2 features). mode: "chunk" (training), "quadratic" (reference) or "recurrent" (a
    token loop); with a cache, single tokens always take the recurrent step and longer inputs
    `mode`, both starting from the cached state. normalize: divide by phi(q).sum phi(k) + eps;
    False drops the denominator and RMS-normalises each head's output instead. rotary rotates
    phi(q), phi(k) in the numerator only, keeping the denominator positive (RoFormer eq. 19);
    maps that depend on q.k alone (taylor, identity) rotate q and k before phi instead.
    Features and states are float32 under autocast; the output is cast back.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        feature_map: str = "elu",
        chunk_size: int = 64,
        mode: str = "chunk",
        normalize: bool = True,
        eps: float = 1e-6,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        check_heads(d_model, num_heads)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r}; choose one of {sorted(FEATURE_MAPS)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1 (64 is a good default)")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {list(MODES)}")
        if eps <= 0:
            raise ValueError(f"eps={eps} must be > 0 (it guards zero denominators)")
        self.phi = FEATURE_MAPS[feature_map]
        if normalize and not self.phi.nonnegative:
            raise ValueError(
                f"feature_map={feature_map!r} can give negative or zero denominators; "
                "set normalize=False (RMS norm on the output) or use elu, relu or taylor"
            )
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        if rotary is not None and rotary.head_dim != self.head_dim:
            raise ValueError(
                f"rotary head_dim={rotary.head_dim} differs from d_model/num_heads={self.head_dim}"
            )
        self.feature_dim = self.phi.dim(self.head_dim)
        self.feature_map, self.chunk_size, self.mode = feature_map, chunk_size, mode
        self.normalize, self.eps = normalize, eps
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # scaled at init by the model
        self.out_norm = None if normalize else nn.RMSNorm(self.head_dim, eps=eps)
        self.rotary = rotary

    def forward(self, x: Tensor, cache: LinearCache | None = None) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, T, D]
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # each [B, H, T, Dh]
        if cache is not None and cache.state.shape[0] != x.shape[0]:
            raise ValueError(f"cache has batch size {cache.state.shape[0]}, input has {x.shape[0]}")
        # Autocast would run these matmuls in bf16; features and states must stay in fp32.
        with torch.autocast(x.device.type, enabled=False):
            y = self._attend(q, k, v, cache)  # [B, H, T, Dh] float32
        return self.out_proj(merge_heads(y).to(v.dtype))  # [B, T, D]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, cache: LinearCache | None) -> Tensor:
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        offset = 0 if cache is None else cache.length
        rotate = self.rotary is not None
        if rotate and self.phi.dot_kernel:  # phi(Rq).phi(Rk) depends on q^T R^T R k only
            q, k, rotate = self.rotary(q, offset), self.rotary(k, offset), False
        q, k = self.phi.fn(q), self.phi.fn(k)  # [B, H, T, Dk]
        qn, kn = (self.rotary(q, offset), self.rotary(k, offset)) if rotate else (q, k)
        state = norm = None
        if cache is not None:
            state, norm = cache.state.to(dtype), cache.norm.to(dtype).unsqueeze(-1)
        form = self._form(q.shape[2], cache is not None)
        if not self.normalize:
            y, state = form(qn, kn, v, state)
            y = self.out_norm(y)
        elif not rotate:  # one pass: the denominator is an extra all-ones value column
            ones = v.new_ones(*v.shape[:-1], 1)  # [B, H, T, 1]
            packed = None if state is None else torch.cat([state, norm], dim=-1)
            out, packed = form(q, k, torch.cat([v, ones], dim=-1), packed)  # [B, H, T, Dv + 1]
            y = out[..., :-1] / (out[..., -1:] + self.eps)
            state, norm = packed[..., :-1], packed[..., -1:]  # [B, H, Dk, Dv], [B, H, Dk, 1]
        else:  # rotated numerator, unrotated (positive) denominator
            num, state = form(qn, kn, v, state)
            den, norm = form(q, k, v.new_ones(*v.shape[:-1], 1), norm)
            y = num / (den + self.eps)
        if cache is not None:
            cache.state = state.to(cache.state.dtype)
            if norm is not None:
                cache.norm = norm.squeeze(-1).to(cache.norm.dtype)
            cache.length += q.shape[2]
        return y

    def _form(self, T: int, cached: bool):
        mode = "recurrent" if cached and T == 1 else self.mode
        if mode == "chunk":
            return lambda q, k, v, s: chunk_form(q, k, v, s, chunk_size=self.chunk_size)
        return quadratic_form if mode == "quadratic" else recurrent_form

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LinearCache:
        """An empty state for `batch_size` rows; `max_len` is not needed (constant size).

        The state is float32 (float64 for a float64 model) whatever `dtype` asks for.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        weight = self.qkv.weight
        device = device or weight.device
        dtype = torch.promote_types(dtype or weight.dtype, torch.float32)
        shape = (batch_size, self.num_heads, self.feature_dim)
        return LinearCache(
            state=torch.zeros(*shape, self.head_dim, device=device, dtype=dtype),
            norm=torch.zeros(shape, device=device, dtype=dtype),
        )

    def mixing_flops(self, seq_len: int) -> float:
        """Per head, with Dk features and Dv values (+1 column for the normaliser): the chunk
        form's causal scores and their values within chunks of C (2 (Dk + Dv) per key, (C + 1) / 2
        keys), plus k^T v into the chunk state and q times the state (2 Dk Dv each); the
        quadratic form's scores over (T + 1) / 2 keys; the recurrent form's 4 Dk Dv per token."""
        dk, dv = self.feature_dim, self.head_dim + int(self.normalize)
        if self.mode == "recurrent":
            per_head = 4 * dk * dv
        elif self.mode == "quadratic":
            per_head = 2 * (dk + dv) * mean_causal_keys(seq_len) + 2 * dk * dv
        else:
            chunk = min(self.chunk_size, seq_len)
            per_head = 2 * (dk + dv) * mean_causal_keys(chunk) + 4 * dk * dv
        return self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        """Numbers held in the cache, whatever seq_len: H * Dk * Dv (+ H * Dk normaliser)."""
        return self.num_heads * self.feature_dim * (self.head_dim + int(self.normalize))
