"""Block-sparse attention in pure PyTorch (ALGORITHMS.md section 3, "Block-sparse computation").

A `BlockLayout` lists, for every block of `q_block` query rows, a contiguous range of key blocks of
`k_block` keys. `block_sparse_attention` gathers only those key/value blocks into
[B, H, nQ, kmax * k_block, Dh], multiplies them with their query block, and applies the
elementwise mask only where the layout says a slot holds an edge block (causal diagonal, far end
of a band, padding). Work and memory are O(nQ * kmax * q_block * k_block): a band of w keys costs
O(T (w + block) Dh), never O(T^2). Scores, softmax statistics and outputs are float32 whatever the
input dtype (autocast is disabled inside), as in the tiled softmax path.

`KeySet` describes one head group's sparse key set as a near part (a band of the last `width`
positions, filtered elementwise) and a far part (strided or summary columns), and
`sparse_attention` computes it: the near part through a band layout, the far part through a
causal-prefix layout over the strided columns (the sequence transposed, as in
openai/sparse_attention) or over the summary columns, merged through their log-sum-exp.
`gather_attention` is the per-query form that decoding uses: every query row brings its own
gathered keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.ops.dropout import dropout as drop

# allowed(q_idx, k_idx) -> bool tensor (broadcasting), the elementwise rule in index space.
Allowed = Callable[[Tensor, Tensor], Tensor]
PREFIX_GROUPS = 4  # query-block groups of a causal-prefix layout: ~1/8 of its triangle is waste


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block attends to, and where the elementwise mask applies."""

    index: Tensor  # [nQ, kmax] key block held by each slot (unused slots are clamped and hidden)
    hidden: Tensor  # [nQ, q_block, kmax * k_block] bool, True where the row must not see the key
    lead: int  # query blocks [0, lead) apply `hidden` to every slot
    edge_cols: tuple[tuple[int, int], ...]  # key columns masked in query blocks [lead, nQ)
    q_start: int  # first query row this layout covers
    num_q: int  # query rows it covers (its last block may be padded)
    num_k: int  # length of the key sequence
    q_block: int
    k_block: int
    shared: bool  # every query block holds the same key blocks (a causal-prefix group)

    @property
    def keys_per_query(self) -> int:
        """Keys multiplied with every query row (the cost per token, up to Dh)."""
        return self.index.shape[1] * self.k_block


def range_layout(
    lo: Tensor,
    hi: Tensor,
    *,
    q_start: int,
    num_q: int,
    num_k: int,
    q_block: int,
    k_block: int,
    allowed: Allowed,
) -> BlockLayout:
    """Query block I (rows q_start + I * q_block ...) attends key blocks lo[I] .. hi[I] inclusive.

    lo, hi: [nQ] long. Slots outside [lo, hi] and keys >= num_k are always hidden; inside, keys
    follow `allowed`. Padding rows past num_q see every real key of their slots, so no row of a
    block with a real key is empty (they are dropped from the output).
    """
    device = lo.device
    nQ, nK = lo.numel(), -(-num_k // k_block)
    lo, hi = lo.clamp(min=0), hi.clamp(max=nK - 1)
    kmax = max(1, int((hi - lo + 1).max()))
    slots = lo[:, None] + torch.arange(kmax, device=device)  # [nQ, kmax]
    used = slots <= hi[:, None]  # [nQ, kmax]
    k_idx = slots[:, :, None] * k_block + torch.arange(k_block, device=device)  # [nQ, kmax, kb]
    k_idx = k_idx.view(nQ, 1, kmax * k_block)  # [nQ, 1, K]
    q_idx = (q_start + torch.arange(nQ * q_block, device=device)).view(nQ, q_block, 1)
    real_key = used.repeat_interleave(k_block, dim=1)[:, None, :] & (k_idx < num_k)  # [nQ, 1, K]
    rule = torch.where(q_idx < q_start + num_q, allowed(q_idx, k_idx), True)  # [nQ, qb, K]
    hidden = ~(real_key & rule)  # [nQ, qb, K]
    # A slot needs the elementwise mask where any of its entries is hidden. Leading query blocks
    # (padding slots before the sequence start) are masked whole; later ones only on edge slots.
    needs = hidden.view(nQ, q_block, kmax, k_block).any(dim=3).any(dim=1)  # [nQ, kmax]
    extra = (needs & ~needs[-1]).any(dim=1)  # [nQ]
    lead = int(extra.nonzero().max()) + 1 if bool(extra.any()) else 0
    edge = needs[lead:].any(dim=0).tolist() if lead < nQ else []
    cols, c = [], 0
    while c < len(edge):  # runs of consecutive edge slots -> one masked_fill_ each
        if edge[c]:
            start = c
            while c < len(edge) and edge[c]:
                c += 1
            cols.append((start * k_block, c * k_block))
        c += 1
    index = slots.clamp(0, nK - 1)
    return BlockLayout(
        index=index,
        hidden=hidden,
        lead=lead,
        edge_cols=tuple(cols),
        q_start=q_start,
        num_q=num_q,
        num_k=num_k,
        q_block=q_block,
        k_block=k_block,
        shared=bool((index == index[0]).all()),
    )


def grouped_layouts(
    lo: Tensor,
    hi: Tensor,
    *,
    groups: int,
    num_q: int,
    num_k: int,
    q_block: int,
    k_block: int,
    allowed: Allowed,
) -> list[BlockLayout]:
    """`range_layout` split into up to `groups` runs of query blocks, each padded to its own
    widest row. For causal-prefix layouts (hi grows with the query block) this skips all but about
    1 / (2 groups) of the masked triangle instead of half of it."""
    nQ = lo.numel()
    groups = max(1, min(groups, nQ))
    bounds = sorted({round(g * nQ / groups) for g in range(groups + 1)})
    layouts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        q_start = a * q_block
        layouts.append(
            range_layout(
                lo[a:b],
                hi[a:b],
                q_start=q_start,
                num_q=min(num_q, b * q_block) - q_start,
                num_k=num_k,
                q_block=q_block,
                k_block=k_block,
                allowed=allowed,
            )
        )
    return layouts


def _pad_time(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 2 of [B, H, T, D] to `length`."""
    return F.pad(x, (0, 0, 0, length - x.shape[2])) if length > x.shape[2] else x


def _gather_blocks(x: Tensor, index: Tensor, block: int) -> Tensor:
    """[B, H, T, D] -> [B, H, nQ, kmax * block, D]: the key blocks listed in index [nQ, kmax]."""
    B, H, T, D = x.shape
    nK = -(-T // block)
    blocks = _pad_time(x, nK * block).view(B, H, nK, block, D)  # [B, H, nK, block, D]
    return blocks[:, :, index].flatten(3, 4)  # [B, H, nQ, kmax * block, D]


def _softmax(s: Tensor, safe: bool) -> tuple[Tensor, Tensor | None]:
    """Row softmax of float32 scores; with safe=True also lse, and empty rows give p=0, lse=-inf."""
    if not safe:  # every row has a visible key
        return s.softmax(dim=-1), None
    m = s.detach().amax(dim=-1, keepdim=True)  # the max only stabilises; lse does not depend on it
    m = m.masked_fill(m == float("-inf"), 0.0)
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)  # >= 1 unless the row is empty
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)  # no division by 0, no log(0) in the backward
    lse = torch.where(nonempty, m + torch.log(total), float("-inf"))
    return e / total, lse.squeeze(-1)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    scale: float,
    safe: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """Attention of rows q[:, :, q_start : q_start + num_q] over the layout's key blocks.

    q: [B, H, Tq, Dh]; k: [B, H, num_k, Dh]; v: [B, H, num_k, Dv]. Returns o [B, H, num_q, Dv]
    float32 and, with safe=True, lse [B, H, num_q] float32 (rows without a visible key: o = 0,
    lse = -inf); safe=False requires every real row to see a key and returns lse=None.
    """
    if k.shape[2] != layout.num_k or v.shape[2] != layout.num_k:
        raise ValueError(f"layout is for {layout.num_k} keys, got k {k.shape}, v {v.shape}")
    B, H, _, Dh = q.shape
    nQ = layout.index.shape[0]
    bq, rows = layout.q_block, slice(layout.q_start, layout.q_start + layout.num_q)
    with torch.autocast(q.device.type, enabled=False):
        qb = _pad_time(q[:, :, rows].float(), nQ * bq).view(B, H, nQ, bq, Dh) * scale
        # Shared slots: one [B, H, 1, K, D] key set multiplied with all rows (no nQ copies).
        index = layout.index[:1] if layout.shared else layout.index
        kg = _gather_blocks(k.float(), index, layout.k_block)  # [B, H, nQ or 1, K, Dh]
        vg = _gather_blocks(v.float(), index, layout.k_block)  # [B, H, nQ or 1, K, Dv]
        if layout.shared:
            s = (qb.view(B, H, 1, nQ * bq, Dh) @ kg.transpose(-1, -2)).view(B, H, nQ, bq, -1)
        else:
            s = qb @ kg.transpose(-1, -2)  # [B, H, nQ, bq, K]
        # Masked in place outside autograd: no node saved s, and the softmax backward is already
        # 0 wherever p = 0, so recording the fill would only add full copies of dS.
        with torch.no_grad():
            lead, hidden = layout.lead, layout.hidden
            if lead:
                s[:, :, :lead].masked_fill_(hidden[:lead], float("-inf"))
            for c0, c1 in layout.edge_cols:  # full key blocks skip the mask
                s[:, :, lead:, :, c0:c1].masked_fill_(hidden[lead:, :, c0:c1], float("-inf"))
        p, lse = _softmax(s, safe)  # [B, H, nQ, bq, K]
        if dropout_p > 0:
            p = drop(p, dropout_p)
        if layout.shared:
            o = p.view(B, H, 1, nQ * bq, -1) @ vg  # [B, H, 1, nQ * bq, Dv]
        else:
            o = p @ vg  # [B, H, nQ, bq, Dv]
        o = o.view(B, H, nQ * bq, -1)[:, :, : layout.num_q]  # [B, H, num_q, Dv]
    if lse is not None:
        lse = lse.flatten(2, 3)[:, :, : layout.num_q]  # [B, H, num_q]
    return o, lse


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layouts: list[BlockLayout],
    *,
    scale: float,
    safe: bool = False,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """`block_sparse_attention` over layouts that cover consecutive query rows; outputs joined."""
    parts = [
        block_sparse_attention(q, k, v, lay, scale=scale, safe=safe, dropout_p=dropout_p)
        for lay in layouts
    ]
    if len(parts) == 1:
        return parts[0]
    o = torch.cat([o for o, _ in parts], dim=2)  # [B, H, Tq, Dv]
    lse = torch.cat([lse for _, lse in parts], dim=2) if safe else None  # [B, H, Tq]
    return o, lse


def merge(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Softmax attention over the union of disjoint key sets from each set's (o, lse).

    o = sum_c o_c * exp(lse_c - lse), lse = logsumexp_c lse_c. A set that a row cannot see
    (lse_c = -inf) gets weight 0; at least one set must be visible to every row.
    """
    lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)  # [B, H, T]
    return sum(o * torch.exp(part_lse - lse)[..., None] for o, part_lse in parts)


def gather_attention(
    q: Tensor, k: Tensor, v: Tensor, visible: Tensor, *, scale: float, dropout_p: float = 0.0
) -> Tensor:
    """Each query row attends its own gathered keys.

    q: [B, H, T, Dh]; k: [B, H, T, K, Dh]; v: [B, H, T, K, Dv]; visible: [T, K] bool with at
    least one True per row. Returns o [B, H, T, Dv] float32.
    """
    with torch.autocast(q.device.type, enabled=False):
        s = (q.float()[..., None, :] * scale) @ k.float().transpose(-1, -2)  # [B, H, T, 1, K]
        s = s.masked_fill(~visible[:, None, :], float("-inf"))
        p = s.softmax(dim=-1)  # [B, H, T, 1, K]
        if dropout_p > 0:
            p = drop(p, dropout_p)
        return (p @ v.float()).squeeze(-2)  # [B, H, T, Dv]


@dataclass(frozen=True)
class KeySet:
    """One head group's keys: a near part within the last `width` positions and a far part.

    near: "band" (i - j < width), "block" (the own block of `stride` positions) or
    "block_summary" (the own block's summary columns and the diagonal); None: no near part.
    far: "stride" (j = i - m * stride for m >= skip) or "summary" (the last `summary` columns of
    every earlier block of `stride` positions); None: no far part. The two parts are disjoint.
    """

    near: str | None
    far: str | None
    width: int
    stride: int
    summary: int
    skip: int = 0

    def near_allowed(self, i: Tensor, j: Tensor) -> Tensor:
        """The near part's elementwise rule for query positions i and key positions j."""
        ok = (j <= i) & (i - j < self.width)
        if self.near in ("block", "block_summary"):
            ok = ok & (j // self.stride == i // self.stride)
        if self.near == "block_summary":
            ok = ok & ((j % self.stride >= self.stride - self.summary) | (j == i))
        return ok


def _memoised(fn):
    """Memoise a layout builder; layouts are plain tensors even when built in inference mode."""

    @functools.lru_cache(maxsize=64)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args)

    return cached


@_memoised
def near_layouts(keys: KeySet, T: int, block: int, device: torch.device) -> list[BlockLayout]:
    """Band layout: query block I sees key blocks from (start - width + 1) to its own."""
    b = min(block, T)
    starts = torch.arange(0, T, b, device=device)  # first row of each query block
    lo = torch.div(starts - keys.width + 1, b, rounding_mode="floor")
    hi = torch.div(starts + b - 1, b, rounding_mode="floor")
    layout = range_layout(
        lo, hi, q_start=0, num_q=T, num_k=T, q_block=b, k_block=b, allowed=keys.near_allowed
    )
    return [layout]


@_memoised
def _stride_layouts(keys: KeySet, R: int, block: int, device: torch.device) -> list[BlockLayout]:
    # Rows r of a column of the transposed sequence; row r2 is (r - r2) strides before row r.
    b = min(block, R)
    hi = torch.div(
        torch.arange(0, R, b, device=device) + b - 1 - keys.skip, b, rounding_mode="floor"
    )
    return grouped_layouts(
        torch.zeros_like(hi),
        hi,
        groups=PREFIX_GROUPS,
        num_q=R,
        num_k=R,
        q_block=b,
        k_block=b,
        allowed=lambda r, r2: r2 <= r - keys.skip,
    )


@_memoised
def _summary_layouts(keys: KeySet, T: int, block: int, device: torch.device) -> list[BlockLayout]:
    # Keys: the summary columns of blocks 0 .. ceil(T / l) - 2, column u of block p at p * c + u.
    l, c = keys.stride, keys.summary
    b = min(block, T)
    last_row = (torch.arange(0, T, b, device=device) + b - 1).clamp(max=T - 1)
    hi = torch.div(last_row // l * c - 1, c, rounding_mode="floor")  # blocks before the row's
    return grouped_layouts(
        torch.zeros_like(hi),
        hi,
        groups=PREFIX_GROUPS,
        num_q=T,
        num_k=(-(-T // l) - 1) * c,
        q_block=b,
        k_block=c,
        allowed=lambda i, s: s // c < i // l,
    )


def sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keys: KeySet,
    *,
    block_size: int,
    scale: float,
    dropout_p: float = 0.0,
) -> Tensor:
    """Causal attention of q [B, H, T, Dh] over `keys` in k, v -> o [B, H, T, Dv] float32."""
    T, parts = q.shape[2], []
    opts = dict(scale=scale, dropout_p=dropout_p)
    if keys.near is not None:
        layouts = near_layouts(keys, T, block_size, q.device)
        parts.append(attend(q, k, v, layouts, safe=keys.far is not None, **opts))
    if keys.far == "stride" and -(-T // keys.stride) > keys.skip:
        parts.append(_strided_far(q, k, v, keys, block_size, opts))
    if keys.far == "summary" and T > keys.stride:
        l, c = keys.stride, keys.summary
        B, H = k.shape[:2]
        n = T // l if T % l else T // l - 1  # blocks whose summary some query sees

        def columns(x: Tensor) -> Tensor:  # [B, H, T, D] -> [B, H, (ceil(T / l) - 1) * c, D]
            blocks = x[:, :, : n * l].reshape(B, H, n, l, -1)  # [B, H, n, l, D]
            return blocks[:, :, :, l - c :].flatten(2, 3)

        layouts = _summary_layouts(keys, T, block_size, q.device)
        parts.append(attend(q, columns(k), columns(v), layouts, safe=True, **opts))
    return parts[0][0] if len(parts) == 1 else merge(parts)


def _strided_far(q: Tensor, k: Tensor, v: Tensor, keys: KeySet, block_size: int, opts: dict):
    """Strided keys as a causal prefix of the transposed sequence: position r * l + u is row r of
    column u, so j = i - m l is an earlier row of i's column."""
    B, H, T, _ = q.shape
    l = keys.stride
    R = -(-T // l)

    def columns(x: Tensor) -> Tensor:  # [B, H, T, D] -> [B, H * l, R, D]
        x = F.pad(x, (0, 0, 0, R * l - T)).reshape(B, H, R, l, -1)  # [B, H, R, l, D]
        return x.transpose(2, 3).reshape(B, H * l, R, -1)

    layouts = _stride_layouts(keys, R, block_size, q.device)
    o, lse = attend(columns(q), columns(k), columns(v), layouts, safe=True, **opts)
    o = o.view(B, H, l, R, -1).transpose(2, 3).reshape(B, H, R * l, -1)[:, :, :T]  # [B,H,T,Dv]
    lse = lse.view(B, H, l, R).transpose(2, 3).reshape(B, H, R * l)[:, :, :T]  # [B, H, T]
    return o, lse
