"""Mamba's causal depthwise conv and its SiLU, fused for CPUs (numba), forward and backward.

y[b, t, d] = silu(bias[d] + sum_k w[d, k] u[b, t - K + 1 + k, d]), with u = 0 before t = 0, on
channels-last [B, T, D] tensors: the layout in_proj gives, so no transpose, no padded copy and no
[B, D, T] temporaries (nn.Conv1d's backward on a CPU took more than the scan's forward). The
backward recomputes the pre-activation instead of storing it. Each batch row is a work item;
the weight and bias gradients come per row and are summed by the caller.
"""

from __future__ import annotations

import numpy as np
import torch

from lmkit.ops.cpu_scan import fast_exp, njit, numba, set_threads


@njit(inline="always")
def _sigmoid(s):
    e = fast_exp(-abs(s))  # exp of a non-positive number: no overflow
    return np.float32(1.0) / (np.float32(1.0) + e) if s >= 0 else e / (np.float32(1.0) + e)


@njit(inline="always")
def _pre_activation(u, w_t, bias, b, t, out):
    """out[d] = bias[d] + sum_k w_t[k, d] u[b, t - K + 1 + k, d] (u = 0 before the start)."""
    K, D = w_t.shape
    for d in range(D):
        out[d] = bias[d]
    for k in range(K):
        src = t - K + 1 + k
        if src >= 0:
            row, taps = u[b, src], w_t[k]
            for d in range(D):
                out[d] += taps[d] * row[d]


@njit(parallel=True, cache=True)
def forward_kernel(u, w_t, bias, y):
    """y = silu(causal depthwise conv of u): u, y [B, T, D], w_t = w^T [K, D], bias [D],
    float32 and C-contiguous."""
    batch, T, D = u.shape
    for b in numba.prange(batch):
        s = np.empty(D, np.float32)
        for t in range(T):
            _pre_activation(u, w_t, bias, b, t, s)
            out = y[b, t]
            for d in range(D):
                out[d] = s[d] * _sigmoid(s[d])


@njit(parallel=True, cache=True)
def backward_kernel(u, w_t, bias, dy, du, dw_t, dbias):
    """du [B, T, D] and, per batch row, dw_t [B, K, D], dbias [B, D] from dy [B, T, D]."""
    batch, T, D = u.shape
    K = w_t.shape[0]
    for b in numba.prange(batch):
        s = np.empty(D, np.float32)
        ds = np.empty(D, np.float32)
        dw_row = np.zeros((K, D), np.float32)
        db_row = np.zeros(D, np.float32)
        for t in range(T):
            du[b, t] = 0
        for t in range(T):
            _pre_activation(u, w_t, bias, b, t, s)
            g = dy[b, t]
            for d in range(D):
                sig = _sigmoid(s[d])
                ds[d] = g[d] * sig * (np.float32(1.0) + s[d] * (np.float32(1.0) - sig))
                db_row[d] += ds[d]
            for k in range(K):
                src = t - K + 1 + k
                if src >= 0:
                    row, grad, taps, dtaps = u[b, src], du[b, src], w_t[k], dw_row[k]
                    for d in range(D):
                        dtaps[d] += ds[d] * row[d]
                        grad[d] += taps[d] * ds[d]
        dw_t[b] = dw_row
        dbias[b] = db_row


class CausalConvSiLU(torch.autograd.Function):
    """The kernels on zero-copy NumPy views of float32 CPU tensors; returns float32."""

    @staticmethod
    def forward(ctx, u, weight, bias):
        u = u.detach().float().contiguous()
        w_t = weight.detach().float().t().contiguous()  # [K, D]
        bias = bias.detach().float().contiguous()
        y = torch.empty_like(u)
        set_threads(torch.get_num_threads())
        forward_kernel(u.numpy(), w_t.numpy(), bias.numpy(), y.numpy())
        ctx.save_for_backward(u, w_t, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, w_t, bias = ctx.saved_tensors
        dy = dy.float().contiguous()
        du = torch.empty_like(u)
        dw_t = u.new_empty(u.shape[0], *w_t.shape)
        dbias = u.new_empty(u.shape[0], w_t.shape[1])
        arrays = (t.numpy() for t in (u, w_t, bias, dy, du, dw_t, dbias))
        set_threads(torch.get_num_threads())
        backward_kernel(*arrays)
        return du, dw_t.sum(0).t(), dbias.sum(0)


def causal_conv_silu(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """silu(causal depthwise conv) of u [B, T, D] with weight [D, K] and bias [D] (float32)."""
    return CausalConvSiLU.apply(u, weight, bias)
