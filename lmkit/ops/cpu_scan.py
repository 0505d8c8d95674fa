"""Mamba's selective scan fused into one compiled loop for CPUs (numba), forward and backward.

The recurrence of `lmkit.mixers.selective_scan` (h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
y_t = C_t . h_t + D x_t) is walked in time inside one loop per (batch row, block of channels): the
block's state [N, channels] stays in the core's L1 cache, the inputs are read once per step, and
no [B, T, D, N] tensor is ever written. Blocks run in parallel on numba's threads (as many as
torch's). The forward stores the state every `CHECKPOINT` steps; the backward walks the chunks
backwards, recomputes each chunk's states from its checkpoint and runs the reverse-time scan of
the gradients through them.

The exponential is a polynomial that the compiler vectorises (libm's expf is a scalar call, and
it was ~3x the cost of the rest of the loop); its relative error is below 4e-7 plus |v| 2^-24, the
order of what rounding its argument dt A to float32 already costs.

Why numba and not a C++ extension: numba installs as a wheel and needs no compiler on the user's
machine; its kernels compile once (about 20 s on 2 cores) and are cached on disk (`cache=True`),
so later processes load them in well under a second. Figures: docs/performance.md.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
except ImportError:  # the caller falls back to the PyTorch scan
    numba = None

# Steps between stored states: the backward recomputes at most this many states per chunk.
CHECKPOINT = 32
# Channels per parallel work item in the forward and the backward: the state block [N, 256] and,
# in the backward, a chunk's recomputed states and decays (2 x 33 x N x 128) stay in L1 / L2.
# 128 in the backward measured 12-23% faster than 64 or 256 (docs/performance.md).
FORWARD_BLOCK, BACKWARD_BLOCK = 256, 128

_LOG2E = np.float32(1.4426950408889634)
# 2^f on [-1/2, 1/2], a degree-6 least-squares fit at Chebyshev nodes (relative error < 1e-7).
_NODES = np.cos(np.pi * (np.arange(256) + 0.5) / 256) / 2
_P = [np.float32(c) for c in np.polynomial.polynomial.polyfit(_NODES, 2.0**_NODES, 6)]
P0, P1, P2, P3, P4, P5, P6 = _P


def available() -> bool:
    return numba is not None


def njit(**options):
    """numba.njit with fastmath, or the plain Python function where numba is missing."""
    return (lambda f: f) if numba is None else numba.njit(fastmath=True, **options)


@njit(inline="always")
def fast_exp(v):
    """exp(v) for float32 v <= 0 as 2^k p(f): the int32 exponent bits give 2^k, so it vectorises."""
    z = max(v * _LOG2E, np.float32(-126.0))  # below 2^-126 the decays are 0 to float32 anyway
    k = np.floor(z + np.float32(0.5))
    f = z - k
    p = (((((P6 * f + P5) * f + P4) * f + P3) * f + P2) * f + P1) * f + P0
    return p * np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)


@njit(parallel=True, cache=True)
def forward(x, dt, A_t, B, C, skip, h0, y, h_last, checkpoints):
    """y [Bsz, T, D], h_last [Bsz, D, N] and the state before every CHECKPOINT-th step,
    checkpoints [Bsz, ceil(T / CHECKPOINT), N, D], from x, dt [Bsz, T, D], A_t = A^T [N, D],
    B, C [Bsz, T, N], skip [D] and h0 [Bsz, D, N]. All float32, C-contiguous."""
    batch, T, D = x.shape
    N = A_t.shape[0]
    blocks = (D + FORWARD_BLOCK - 1) // FORWARD_BLOCK
    for item in numba.prange(batch * blocks):
        b, d0 = item // blocks, (item % blocks) * FORWARD_BLOCK
        w = min(D, d0 + FORWARD_BLOCK) - d0
        h = np.empty((N, w), np.float32)
        for n in range(N):
            for j in range(w):
                h[n, j] = h0[b, d0 + j, n]
        out, decay = np.empty(w, np.float32), np.empty((N, w), np.float32)
        for t in range(T):
            if t % CHECKPOINT == 0:
                for n in range(N):
                    for j in range(w):
                        checkpoints[b, t // CHECKPOINT, n, d0 + j] = h[n, j]
            xs, dts = x[b, t, d0 : d0 + w], dt[b, t, d0 : d0 + w]
            _step(xs, dts, A_t, d0, B[b, t], C[b, t], h, out, decay)
            for j in range(w):
                y[b, t, d0 + j] = out[j] + skip[d0 + j] * x[b, t, d0 + j]
        for n in range(N):
            for j in range(w):
                h_last[b, d0 + j, n] = h[n, j]


@njit(inline="always")
def _step(x, dt, A_t, d0, B, C, h, out, decay):
    """One step of one block: h <- exp(dt A) h + dt B x in place, out = C . h and decay =
    exp(dt A), for x, dt, out [w], h, decay [N, w], B, C [N] and the block's columns d0.. of
    A_t [N, D] (sliced per row: a row of a column slice has unknown strides, which stops
    vectorisation). Outputs go to arrays
    local to the work item: a write through an argument could alias the inputs, which also stops
    the compiler from vectorising."""
    N, w = h.shape
    for j in range(w):
        out[j] = 0
    for n in range(N):
        a_row, h_row, decay_row, bn, cn = A_t[n, d0 : d0 + w], h[n], decay[n], B[n], C[n]
        for j in range(w):
            a = fast_exp(dt[j] * a_row[j])
            decay_row[j] = a
            v = a * h_row[j] + dt[j] * x[j] * bn
            h_row[j] = v
            out[j] += cn * v


@njit(parallel=True, cache=True)
def backward(x, dt, A_t, B, C, skip, checkpoints, dy, dh_last, dx, ddt, dA_t, dB, dC, dskip, dh0):
    """Gradients of the forward's inputs from dy [Bsz, T, D] and dh_last [Bsz, D, N].

    dx, ddt [Bsz, T, D] and dh0 [Bsz, D, N] are written whole; the parameters' gradients come
    per work item and are summed by the caller: dA_t, dskip [Bsz, N, D] / [Bsz, D] per batch row,
    dB, dC [blocks, Bsz, T, N] per channel block (no two threads write one element).
    """
    batch, T, D = x.shape
    N = A_t.shape[0]
    blocks = (D + BACKWARD_BLOCK - 1) // BACKWARD_BLOCK
    for item in numba.prange(batch * blocks):
        b, blk = item // blocks, item % blocks
        d0 = blk * BACKWARD_BLOCK
        w = min(D, d0 + BACKWARD_BLOCK) - d0
        g = np.empty((N, w), np.float32)  # dL/dh_t, carried back in time
        for n in range(N):
            for j in range(w):
                g[n, j] = dh_last[b, d0 + j, n]
        dA_loc = np.zeros((N, w), np.float32)
        dx_t, ddt_t = np.empty(w, np.float32), np.empty(w, np.float32)
        states = np.empty((CHECKPOINT + 1, N, w), np.float32)  # h_{t0 - 1} .. h_{t0 + K - 1}
        decays = np.empty((CHECKPOINT, N, w), np.float32)  # exp(dt A) of the chunk's steps
        scratch = np.empty(w, np.float32)
        for c in range((T + CHECKPOINT - 1) // CHECKPOINT - 1, -1, -1):
            t0 = c * CHECKPOINT
            t1 = min(T, t0 + CHECKPOINT)
            for n in range(N):
                for j in range(w):
                    states[0, n, j] = checkpoints[b, c, n, d0 + j]
            for t in range(t0, t1):  # recompute the chunk's states
                states[t - t0 + 1] = states[t - t0]
                xs, dts = x[b, t, d0 : d0 + w], dt[b, t, d0 : d0 + w]
                _step(xs, dts, A_t, d0, B[b, t], C[b, t], states[t - t0 + 1], scratch,
                      decays[t - t0])
            for t in range(t1 - 1, t0 - 1, -1):
                xs, dts, dys = x[b, t, d0 : d0 + w], dt[b, t, d0 : d0 + w], dy[b, t, d0 : d0 + w]
                _reverse_step(xs, dts, A_t, d0, B[b, t], C[b, t], dys, states[t - t0],
                              decays[t - t0], states[t - t0 + 1], g, dx_t, ddt_t, dA_loc,
                              dB[blk, b, t], dC[blk, b, t])
                for j in range(w):
                    dx[b, t, d0 + j] = dx_t[j] + dys[j] * skip[d0 + j]
                    ddt[b, t, d0 + j] = ddt_t[j]
                    dskip[b, d0 + j] += dys[j] * xs[j]
        for n in range(N):
            for j in range(w):
                dA_t[b, n, d0 + j] = dA_loc[n, j]
        for n in range(N):
            for j in range(w):
                dh0[b, d0 + j, n] = g[n, j]


@njit(inline="always")
def _reverse_step(x, dt, A_t, d0, B, C, dy, h_prev, decay, h, g, dx, ddt, dA_t, dB, dC):
    """One step back for one block (shapes as in `_step`): g holds dL/dh_t from the future on
    entry and dL/dh_{t-1} on return; decay = exp(dt A) as the recomputation kept it; dx, ddt
    [w] get this step's gradients (without the skip), dA_t [N, w] accumulates, dB, dC [N] get
    this block's share."""
    N, w = h.shape
    for j in range(w):
        dx[j] = 0
        ddt[j] = 0
    for n in range(N):
        a_row, g_row, h_row, hp_row = A_t[n, d0 : d0 + w], g[n], h[n], h_prev[n]
        decay_row, dA_row = decay[n], dA_t[n]
        bn, cn = B[n], C[n]
        db = np.float32(0.0)
        dc = np.float32(0.0)
        for j in range(w):
            gn = g_row[j] + dy[j] * cn  # total dL/dh_t: the future's and this output's
            dc += dy[j] * h_row[j]
            a = decay_row[j]
            dz = gn * hp_row[j] * a  # dL/d(dt A)
            dA_row[j] += dz * dt[j]
            ddt[j] += dz * a_row[j] + gn * bn * x[j]
            dx[j] += gn * bn * dt[j]
            db += gn * dt[j] * x[j]
            g_row[j] = gn * a
        dB[n] = db
        dC[n] = dc


def set_threads(count: int) -> None:
    """Run the kernels on `count` threads (capped by numba's pool)."""
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))


def checkpoint_count(T: int) -> int:
    return math.ceil(T / CHECKPOINT)
