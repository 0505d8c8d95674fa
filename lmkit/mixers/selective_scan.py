"""Mamba's selective scan: the sequential reference, a chunked parallel form in PyTorch, and the
fused CPU loop of `lmkit.ops.cpu_scan`.

Both compute, per channel d and state n (Gu & Dao 2023, eq. 2a with ZOH for A, Euler for B):

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] x_t[d],   y_t[d] = C_t . h_t[d]

for x, dt: [B, T, D], A: [D, N], B, C: [B, T, N] and an optional initial state h0: [B, D, N], and
return y: [B, T, D] and the final state [B, D, N], both float32 whatever the input dtype.

The chunked form cuts time into chunks of `chunk_size`: a loop over the positions of a chunk runs
all chunks at once, and a short loop over chunks carries the state between them (the decays are
products of exp(dt A) <= 1, so nothing can overflow, unlike exp of a cumulative sum). Time is cut
into segments of a few chunks processed one after another, so the [S, B, D, N] work tensors stay
small (cache-resident on a CPU) and are reused; what is kept for the backward is the [B, T, .]
inputs plus one state and one decay per chunk. The backward is written out (a reverse-time scan of
the gradients that recomputes each segment's states) instead of recorded by autograd, which would
keep several [B, T, D, N] tensors and thousands of graph nodes.

The fused form ("fused") walks time in one compiled loop that keeps the state in cache; on a
CPU it is several times faster than the chunked form (docs/performance.md). It needs numba; where
numba is missing, or on a GPU, "fused" runs the chunked form (a GPU's fused kernel is mamba_ssm's,
chosen by the Mamba module).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.ops import cpu_scan

log = logging.getLogger(__name__)

MODES = ("fused", "parallel", "sequential")
# Elements (B * S * D * N) of one segment's work tensor: 2^20 fp32 = 4 MiB keeps a segment's few
# tensors near a CPU core's cache; a GPU prefers fewer, larger launches.
SEGMENT_ELEMENTS = {"cpu": 2**20, "cuda": 2**25}


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    h0: Tensor | None = None,
    *,
    mode: str = "parallel",
    chunk_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """y [B, T, D] and final state [B, D, N] of the selective scan (see the module docstring),
    plus the skip D * x when D [D] is given (fused: saves [B, T, D] temporaries)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {list(MODES)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    with torch.autocast(x.device.type, enabled=False):  # the scan runs in float32 throughout
        x, dt, A, B, C = (t.float() for t in (x, dt, A, B, C))
        D = None if D is None else D.float()
        h0 = x.new_zeros(x.shape[0], x.shape[2], A.shape[1]) if h0 is None else h0.float()
        if mode == "fused" and x.device.type == "cpu" and fused_available():
            skip = torch.zeros_like(A[:, 0]) if D is None else D
            return _FusedScan.apply(x, dt, A, B, C, skip, h0)
        if mode == "sequential" or x.shape[1] == 1:  # one step: the same arithmetic either way
            return selective_scan_sequential(x, dt, A, B, C, D, h0)
        return _ChunkedScan.apply(x, dt, A, B, C, D, h0, chunk_size)


@functools.cache
def fused_available() -> bool:
    """Whether the fused CPU scan can run (numba imports); says once in the log when it cannot."""
    if not cpu_scan.available():
        log.warning("numba is not installed: the CPU selective scan falls back to scan=parallel")
    return cpu_scan.available()


class _FusedScan(torch.autograd.Function):
    """The numba kernels on zero-copy NumPy views of contiguous float32 CPU tensors."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, skip, h0):
        x, dt, B, C, skip, h0 = (t.detach().contiguous() for t in (x, dt, B, C, skip, h0))
        A_t = A.detach().t().contiguous()  # [N, D]: the kernels read states along channels
        Bsz, T, D = x.shape
        y, h_last = torch.empty_like(x), torch.empty_like(h0)
        checkpoints = x.new_empty(Bsz, cpu_scan.checkpoint_count(T), A.shape[1], D)
        cpu_scan.set_threads(torch.get_num_threads())
        cpu_scan.forward(*_arrays(x, dt, A_t, B, C, skip, h0, y, h_last, checkpoints))
        ctx.save_for_backward(x, dt, A_t, B, C, skip, checkpoints)
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        x, dt, A_t, B, C, skip, checkpoints = ctx.saved_tensors
        Bsz, T, D = x.shape
        N = A_t.shape[0]
        dy = x.new_zeros(x.shape) if dy is None else dy.float().contiguous()
        dh_last = x.new_zeros(Bsz, D, N) if dh_last is None else dh_last.float().contiguous()
        blocks = -(-D // cpu_scan.BACKWARD_BLOCK)
        dx, ddt = torch.empty_like(x), torch.empty_like(dt)
        dA_t, dskip = x.new_empty(Bsz, N, D), x.new_zeros(Bsz, D)
        dB, dC = x.new_empty(2, blocks, Bsz, T, N)
        dh0 = torch.empty_like(dh_last)
        cpu_scan.set_threads(torch.get_num_threads())
        cpu_scan.backward(*_arrays(
            x, dt, A_t, B, C, skip, checkpoints, dy, dh_last, dx, ddt, dA_t, dB, dC, dskip, dh0
        ))
        return dx, ddt, dA_t.sum(0).t(), dB.sum(0), dC.sum(0), dskip.sum(0), dh0


def _arrays(*tensors: Tensor):
    return tuple(t.numpy() for t in tensors)


def selective_scan_sequential(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """The reference: a Python loop over time, recorded by autograd (unbind / stack, no writes)."""
    a = torch.exp(dt.unsqueeze(-1) * A)  # [B, T, D, N]
    b = (dt * x).unsqueeze(-1) * B.unsqueeze(2)  # [B, T, D, N]
    h, ys = h0, []
    for a_t, b_t, c_t in zip(a.unbind(1), b.unbind(1), C.unbind(1), strict=True):
        h = a_t * h + b_t  # [B, D, N]
        ys.append(torch.bmm(h, c_t.unsqueeze(-1)).squeeze(-1))  # [B, D]
    y = torch.stack(ys, dim=1)  # [B, T, D]
    return (y if D is None else y + x * D), h


def _chunk_starts_(starts: Tensor, decay: Tensor, b: Tensor, a: Tensor, chunk: int) -> None:
    """Fill starts[1:] (the state before each chunk; starts[0] is given) and decay (each chunk's
    product of a), both [K, B, D, N], from b, a: [K * chunk, B, D, N].

    A loop over the positions of a chunk runs every chunk at once from a zero state; a loop over
    the K chunks then carries the true state across them.
    """
    b, a = b.unflatten(0, (-1, chunk)), a.unflatten(0, (-1, chunk))  # [K, C, B, D, N]
    torch.prod(a, dim=1, out=decay)
    if b.shape[0] == 1:
        return
    bs, as_ = b[:-1].unbind(1), a[:-1].unbind(1)  # per position: views made once, not per step
    end = bs[0].clone()  # [K - 1, B, D, N]: the last chunk's end is not needed
    for i in range(1, chunk):
        torch.addcmul(bs[i], as_[i], end, out=end)
    for k in range(b.shape[0] - 1):
        torch.addcmul(end[k], decay[k], starts[k], out=starts[k + 1])


def _scan_(h: Tensor, a: Tensor, starts: Tensor, chunk: int) -> None:
    """In place h_t <- a_t h_{t-1} + h_t (h holds b on entry), each chunk from its start state."""
    hs = h.unflatten(0, (-1, chunk)).unbind(1)  # C views [K, B, D, N], one per position
    as_ = a.unflatten(0, (-1, chunk)).unbind(1)
    hs[0].addcmul_(as_[0], starts)
    for i in range(1, chunk):
        hs[i].addcmul_(as_[i], hs[i - 1])


def _reverse_scan_(g: Tensor, a: Tensor, decay: Tensor, q: Tensor, chunk: int) -> Tensor:
    """In place g_t <- g_t + a_{t+1} g_{t+1} with a_S g_S = q; returns a_0 g_0.

    g holds dL/dh_t from the outputs on entry and the total dL/dh_t on return; q is the gradient
    reaching the segment's last state from the next segment, the return value the one leaving it.
    decay: each chunk's product of a. The same two-level scheme as the forward, run backwards.
    """
    gs = g.unflatten(0, (-1, chunk)).unbind(1)  # C views [K, B, D, N], one per position
    as_ = a.unflatten(0, (-1, chunk)).unbind(1)
    first = gs[-1].clone()  # [K, B, D, N]
    for i in range(chunk - 2, -1, -1):
        torch.addcmul(gs[i], as_[i + 1], first, out=first)
    leaving = first.mul_(as_[0])  # each chunk's own gradient to the state before it
    entering = torch.empty_like(leaving)  # gradient reaching each chunk's last state
    entering[-1] = q
    for k in range(len(leaving) - 1, 0, -1):
        torch.addcmul(leaving[k], decay[k], entering[k], out=entering[k - 1])
    gs[-1].add_(entering)
    for i in range(chunk - 2, -1, -1):
        gs[i].addcmul_(as_[i + 1], gs[i + 1])
    return torch.addcmul(leaving[0], decay[0], entering[0])


class _ChunkedScan(torch.autograd.Function):
    """Time-major work tensors [n, B, D, N]; the [B, T, .] inputs are read through views.

    Saves the inputs and, per chunk, its start state and decay ([T / chunk, B, D, N] each); the
    backward recomputes each segment's states from them, then runs the reverse scan.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, skip, h0, chunk):
        Bsz, T, D = x.shape
        N = A.shape[1]
        chunk = min(chunk, T)
        if T % chunk:  # dt = 0 there: a = 1, b = 0, the state passes through unchanged
            x, dt, B, C = (F.pad(t, (0, 0, 0, -T % chunk)) for t in (x, dt, B, C))
        Tp = x.shape[1]
        S = min(Tp, chunk * max(1, SEGMENT_ELEMENTS[_kind(x)] // (Bsz * D * N * chunk)))
        a_buf, h_buf = x.new_empty(S, Bsz, D, N), x.new_empty(S + 1, Bsz, D, N)
        starts, decays = x.new_empty(2, Tp // chunk, Bsz, D, N)
        starts[0] = h0
        y = x.new_empty(Bsz, Tp, D)
        for t0 in range(0, Tp, S):
            s, k = slice(t0, t0 + S), slice(t0 // chunk, (t0 + S) // chunk)
            a, h = _inputs(x, dt, A, B, s, starts[k][0], a_buf, h_buf)
            _chunk_starts_(starts[k.start : k.stop + 1], decays[k], h, a, chunk)
            _scan_(h, a, starts[k], chunk)
            ys = _contract_n(h, C[:, s].transpose(0, 1))  # [n, B, D]
            if skip is not None:
                ys.addcmul_(x[:, s].transpose(0, 1), skip)
            y[:, s] = ys.transpose(0, 1)
            if k.stop < len(starts):
                starts[k.stop] = h[-1]
        h_last = h[-1].clone()
        ctx.save_for_backward(x, dt, A, B, C, skip, starts, decays)
        ctx.chunk, ctx.S, ctx.T = chunk, S, T
        return y[:, :T], h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        x, dt, A, B, C, skip, starts, decays = ctx.saved_tensors
        chunk, S, T = ctx.chunk, ctx.S, ctx.T
        Bsz, Tp, D = x.shape
        N = A.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            dy = F.pad(dy.float(), (0, 0, 0, Tp - T)) if Tp > T else dy.float()
            q = dh_last.float()  # gradient reaching the last state from the right
            a_buf, g_buf = x.new_empty(S, Bsz, D, N), x.new_empty(S, Bsz, D, N)
            h_buf = x.new_empty(S + 1, Bsz, D, N)
            dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, B, C))
            dA = torch.zeros_like(A)
            dskip = None if skip is None else torch.zeros_like(skip)
            for t0 in reversed(range(0, Tp, S)):
                s, k = slice(t0, t0 + S), slice(t0 // chunk, (t0 + S) // chunk)
                xs, dts, Bs, Cs, dys = (t[:, s].transpose(0, 1) for t in (x, dt, B, C, dy))
                n = xs.shape[0]
                a, h = _inputs(x, dt, A, B, s, starts[k][0], a_buf, h_buf)
                _scan_(h, a, starts[k], chunk)
                dC[:, s] = _contract_d(h, dys).transpose(0, 1)
                g = torch.mul(dys.unsqueeze(-1), Cs.unsqueeze(2), out=g_buf[:n])  # dL/dh_t
                q = _reverse_scan_(g, a, decays[k], q, chunk)
                dz = a.mul_(h_buf[:n]).mul_(g)  # dL/d(dt A)_t = g_t a_t h_{t-1}: [n, B, D, N]
                rows = dz.view(-1, D, N)  # [n B, D, N]
                dtT = dts.reshape(-1, D).t().unsqueeze(-1)  # [D, n B, 1]
                dA += torch.bmm(rows.permute(1, 2, 0), dtT)[..., 0]
                ddt_a = torch.bmm(rows.transpose(0, 1), A.unsqueeze(-1))[..., 0].t()  # [n B, D]
                ddtx = _contract_n(g, Bs)  # dL/d(dt x): [n, B, D]
                dB[:, s] = _contract_d(g, dts * xs).transpose(0, 1)
                dxs = torch.mul(ddtx, dts, out=dx[:, s].transpose(0, 1))
                if skip is not None:
                    dxs.addcmul_(dys, skip)
                    dskip += (dys * xs).sum((0, 1))
                torch.addcmul(ddt_a.view_as(xs), ddtx, xs, out=ddt[:, s].transpose(0, 1))
        return dx[:, :T], ddt[:, :T], dA, dB[:, :T], dC[:, :T], dskip, q, None


def _kind(x: Tensor) -> str:
    return "cpu" if x.device.type == "cpu" else "cuda"


def _inputs(x, dt, A, B, s, h_in, a_buf, h_buf):
    """Decays a = exp(dt A) and inputs b = dt B x of the segment s of [B, T, .] inputs, both
    [n, B, D, N]; b lands in h_buf[1 : n + 1] after h_buf[0] = h_in, so that once the scan has
    turned b into h in place, h_buf[:n] holds h_{t-1}."""
    dt, x, B = (t[:, s].transpose(0, 1) for t in (dt, x, B))  # [n, B, .] views
    n = x.shape[0]
    a = torch.mul(dt.unsqueeze(-1), A, out=a_buf[:n]).exp_()  # [n, B, D, N]
    h_buf[0] = h_in
    b = torch.mul((dt * x).unsqueeze(-1), B.unsqueeze(2), out=h_buf[1 : n + 1])  # [n, B, D, N]
    return a, b


def _contract_n(h: Tensor, c: Tensor) -> Tensor:
    """sum_n h[..., d, n] c[..., n]: [n, B, D, N], [n, B, N] -> [n, B, D]."""
    D, N = h.shape[-2:]
    rows = torch.bmm(c.reshape(-1, 1, N), h.view(-1, D, N).transpose(1, 2))  # [n B, 1, D]
    return rows.view(c.shape[:-1] + (D,))


def _contract_d(h: Tensor, v: Tensor) -> Tensor:
    """sum_d h[..., d, n] v[..., d]: [n, B, D, N], [n, B, D] -> [n, B, N]."""
    D, N = h.shape[-2:]
    return torch.bmm(v.reshape(-1, 1, D), h.view(-1, D, N)).view(v.shape[:-1] + (N,))
