"""Tiled online-softmax attention in pure PyTorch (FlashAttention-2 order, Dao 2023).

The forward scans key tiles with a running max / normaliser (ALGORITHMS.md section 1) and saves
only (q, k, v, o, lse); the backward recomputes every score tile from q and k. Training memory is
therefore O(T d) per head instead of the O(T^2) of materialised scores. Causal masking is
bottom-right aligned (query i sees key j iff j <= i + Tk - Tq, the KV-cache convention); key tiles
entirely above the diagonal are skipped, and the elementwise mask is built only for tiles that
straddle it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _key_end(q_end: int, Tk: int, shift: int, causal: bool) -> int:
    """Keys at or after this index are masked for every query row before q_end."""
    return max(0, min(Tk, q_end + shift)) if causal else Tk


def _scores(
    q_i: Tensor, k_j: Tensor, q_start: int, k_start: int, shift: int, causal: bool
) -> Tensor:
    """Scaled scores of one tile, masked only when the tile straddles the causal diagonal."""
    s = q_i @ k_j.transpose(-1, -2)  # [B, H, Cq, Ck]; q_i is already scaled
    Cq, Ck = s.shape[-2:]
    if causal and k_start + Ck - 1 > q_start + shift:  # some key is after the first row's limit
        rows = torch.arange(q_start, q_start + Cq, device=s.device)[:, None]  # [Cq, 1]
        cols = torch.arange(k_start, k_start + Ck, device=s.device)[None, :]  # [1, Ck]
        s = s.masked_fill(cols > rows + shift, float("-inf"))
    return s


def _forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, tile: int
) -> tuple[Tensor, Tensor]:
    B, H, Tq, _ = q.shape
    Tk, Dv = k.shape[-2], v.shape[-1]
    shift = Tk - Tq
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 statistics for bf16/fp16
    o = q.new_empty(B, H, Tq, Dv)  # [B, H, Tq, Dv]
    lse = q.new_empty(B, H, Tq, dtype=acc_dtype)  # [B, H, Tq]
    for q0 in range(0, Tq, tile):
        q1 = min(q0 + tile, Tq)
        q_i = q[:, :, q0:q1].to(acc_dtype) * scale  # [B, H, Cq, Dh]
        m = q_i.new_full((B, H, q1 - q0), float("-inf"))  # running row max  [B, H, Cq]
        l = q_i.new_zeros(B, H, q1 - q0)  # running normaliser                   [B, H, Cq]
        acc = q_i.new_zeros(B, H, q1 - q0, Dv)  # unnormalised output          [B, H, Cq, Dv]
        for k0 in range(0, _key_end(q1, Tk, shift, causal), tile):
            k1 = min(k0 + tile, Tk)
            s = _scores(q_i, k[:, :, k0:k1].to(acc_dtype), q0, k0, shift, causal)  # [B,H,Cq,Ck]
            m_new = torch.maximum(m, s.amax(dim=-1))  # [B, H, Cq]
            # A row with no visible key yet has m_new = -inf; exp(-inf - (-inf)) would be NaN.
            m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)
            p = torch.exp(s - m_use[..., None])  # [B, H, Cq, Ck]; masked entries -> 0
            alpha = torch.exp(m - m_use)  # rescales the old statistics  [B, H, Cq]
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v[:, :, k0:k1].to(acc_dtype)  # [B, H, Cq, Dv]
            m = m_new
        # Fully masked rows (l = 0) give output 0 and lse = -inf.
        o[:, :, q0:q1] = (acc / l.masked_fill(l == 0, 1.0)[..., None]).to(o.dtype)
        lse[:, :, q0:q1] = m + torch.log(l)
    return o, lse


def _backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    dlse: Tensor,
    causal: bool,
    scale: float,
    tile: int,
) -> tuple[Tensor, Tensor, Tensor]:
    Tq, Tk = q.shape[-2], k.shape[-2]
    shift = Tk - Tq
    acc_dtype = lse.dtype
    dk = torch.zeros_like(k, dtype=acc_dtype)  # [B, H, Tk, Dh]
    dv = torch.zeros_like(v, dtype=acc_dtype)  # [B, H, Tk, Dv]
    dq = torch.zeros_like(q, dtype=acc_dtype)  # [B, H, Tq, Dh]
    # Delta = rowsum(dO * O); a gradient on lse adds dlse * P to dS, i.e. subtracts from Delta.
    delta = (do.to(acc_dtype) * o.to(acc_dtype)).sum(dim=-1) - dlse  # [B, H, Tq]
    lse = lse.masked_fill(lse == float("-inf"), 0.0)  # fully masked rows: P = exp(-inf) = 0
    for q0 in range(0, Tq, tile):
        q1 = min(q0 + tile, Tq)
        q_i = q[:, :, q0:q1].to(acc_dtype) * scale  # [B, H, Cq, Dh]
        do_i = do[:, :, q0:q1].to(acc_dtype)  # [B, H, Cq, Dv]
        lse_i, delta_i = lse[:, :, q0:q1, None], delta[:, :, q0:q1, None]  # [B, H, Cq, 1]
        for k0 in range(0, _key_end(q1, Tk, shift, causal), tile):
            k1 = min(k0 + tile, Tk)
            k_j, v_j = k[:, :, k0:k1].to(acc_dtype), v[:, :, k0:k1].to(acc_dtype)  # [B,H,Ck,D]
            p = torch.exp(_scores(q_i, k_j, q0, k0, shift, causal) - lse_i)  # [B, H, Cq, Ck]
            dv[:, :, k0:k1] += p.transpose(-1, -2) @ do_i  # [B, H, Ck, Dv]
            dp = do_i @ v_j.transpose(-1, -2)  # [B, H, Cq, Ck]
            ds = p * (dp - delta_i)  # [B, H, Cq, Ck]
            dq[:, :, q0:q1] += scale * (ds @ k_j)  # [B, H, Cq, Dh]
            dk[:, :, k0:k1] += ds.transpose(-1, -2) @ q_i  # q_i carries the scale  [B,H,Ck,Dh]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, tile_size):
        # Autocast would run the tile matmuls in bf16/fp16; the statistics must stay in fp32.
        with torch.autocast(q.device.type, enabled=False):
            o, lse = _forward(q, k, v, causal, scale, tile_size)
        ctx.save_for_backward(q, k, v, o, lse)  # O(T d): no score tile is kept
        ctx.causal, ctx.scale, ctx.tile_size = causal, scale, tile_size
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(q, k, v, o, lse, do, dlse, ctx.causal, ctx.scale, ctx.tile_size)
        return dq, dk, dv, None, None, None


def tiled_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    tile_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Like `tiled_attention`, also returning lse = logsumexp of each row's scaled masked scores.

    Returns o [B, H, Tq, Dv] in q's dtype and lse [B, H, Tq] in float32 (float64 for float64
    inputs); fully masked rows have o = 0 and lse = -inf. Both outputs are differentiable.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, Dh]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"incompatible shapes q={q.shape}, k={k.shape}, v={v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if tile_size < 1:
        raise ValueError(f"tile_size={tile_size} must be >= 1")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TiledAttention.apply(q, k, v, causal, scale, tile_size)


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    tile_size: int = 128,
) -> Tensor:
    """softmax(q k^T * scale, bottom-right causal mask) v, tile by tile in O(T d) memory.

    q: [B, H, Tq, Dh]; k: [B, H, Tk, Dh]; v: [B, H, Tk, Dv] -> [B, H, Tq, Dv] in q's dtype.
    scale defaults to 1/sqrt(Dh); tile_size is the length of both query and key tiles.
    """
    return tiled_attention_forward(q, k, v, causal=causal, scale=scale, tile_size=tile_size)[0]
