"""Causal sparse attention: sliding window and the Sparse Transformer's strided / fixed patterns."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.mixers.base import Mixer, check_heads, merge_heads, split_heads
from lmkit.mixers.block_sparse import KeySet, gather_attention, sparse_attention
from lmkit.ops.rotary import RotaryEmbedding

PATTERNS = ("local", "strided", "fixed")
COMBINES = ("union", "split")
BACKENDS = ("block_sparse", "dense_reference")
ROLLBACK = 64  # tokens a cache can crop back beyond the window (a speculative candidate tree)
MAX_GATHER = 256  # query rows per gathered chunk while decoding (bounds the gathered keys)


@functools.lru_cache(maxsize=64)
def allowed_pairs(
    pattern: str, window: int, stride: int, summary: int, part: str, seq_len: int
) -> int:
    """(query, key) pairs a pattern allows in a causal window of seq_len (the same for every
    layer of a model, so counted once)."""
    pos, pairs = torch.arange(seq_len), 0
    for r0 in range(0, seq_len, 1024):  # rows in slices: T x T bools would be large
        rows = pos[r0 : r0 + 1024, None]
        mask = pattern_mask(
            rows,
            pos[None],
            pattern=pattern,
            window=window,
            stride=stride,
            summary=summary,
            part=part,
        )
        pairs += int(mask.sum())
    return pairs


def pattern_mask(
    i: Tensor, j: Tensor, *, pattern: str, window: int, stride: int, summary: int, part: str
) -> Tensor:
    """True where query position i may attend key position j (broadcasting), as in the paper.

    local: the last `window` positions. strided: A1 = the last `window` positions, A2 = every
    `stride`-th earlier position. fixed: A1 = the own block of `stride` positions, A2 = the last
    `summary` columns of every block. part: "all" = A1 | A2 (merged head), "first" = A1,
    "second" = A2 plus the diagonal (split heads; the diagonal keeps every row non-empty).
    """
    causal = j <= i
    if pattern == "local":
        return causal & (i - j < window)
    if pattern == "strided":
        a1, a2 = i - j < window, (i - j) % stride == 0
    else:
        a1, a2 = j // stride == i // stride, j % stride >= stride - summary
    if part == "first":
        return causal & a1
    if part == "second":
        return causal & (a2 | (i == j))
    return causal & (a1 | a2)


@dataclass
class SparseCache:
    """Decoding state of `SparseAttention`.

    The ring holds the keys/values of the last `capacity` positions, position p in slot
    p % capacity: for `local` the window (w - 1 past keys) plus `rollback` positions that `crop`
    can take back; for `fixed` the own block (stride - 1 past keys) plus `rollback`, and the
    summary buffers keep the `summary` last keys of every block; for `strided` every key (any
    earlier position is some later query's strided key), so the ring is a plain KV cache.
    """

    k: Tensor  # [B, H, capacity, Dh] ring buffer
    v: Tensor  # [B, H, capacity, Dv]
    summary_k: Tensor | None  # fixed: [B, H, ceil(max_len / stride) * summary, Dh], else None
    summary_v: Tensor | None
    max_len: int
    reach: int  # past positions a new token's near part reads from the ring
    stride: int
    summary: int
    length: int = 0
    start: int = 0  # oldest position still in the ring

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def chunk(self) -> int:
        """Most new tokens one write may add without evicting a key they attend to."""
        if self.capacity >= self.max_len:  # nothing is ever evicted
            return MAX_GATHER
        return min(MAX_GATHER, self.capacity - self.reach)

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows."""
        self.k, self.v = self.k[rows], self.v[rows]
        if self.summary_k is not None:
            self.summary_k, self.summary_v = self.summary_k[rows], self.summary_v[rows]

    def crop(self, length: int) -> None:
        """Forget every token after the first `length`, if the ring still holds what they need."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop to length={length}; the cache holds {self.length}")
        need = max(0, length - self.reach)
        if need < self.start:
            raise ValueError(
                f"cannot crop to length={length}: the ring buffer of {self.capacity} positions "
                f"no longer holds positions {need}..{self.start - 1} that the next token attends "
                f"to; create the cache with init_cache(..., rollback>={self.length - length})"
            )
        self.length = length

    def write(self, k: Tensor, v: Tensor) -> None:
        """Append k, v [B, H, t, D] (t <= chunk) at positions length .. length + t - 1."""
        t = k.shape[2]
        pos = torch.arange(self.length, self.length + t, device=self.k.device)
        self.k.index_copy_(2, pos % self.capacity, k.to(self.k.dtype))
        self.v.index_copy_(2, pos % self.capacity, v.to(self.v.dtype))
        if self.summary_k is not None:
            l, c = self.stride, self.summary
            col = pos % l
            is_summary = col >= l - c
            slots = (pos // l * c + col - (l - c))[is_summary]
            self.summary_k.index_copy_(2, slots, k[:, :, is_summary].to(self.summary_k.dtype))
            self.summary_v.index_copy_(2, slots, v[:, :, is_summary].to(self.summary_v.dtype))
        self.length += t
        self.start = max(self.start, self.length - self.capacity)


class SparseAttention(Mixer):
    """Causal sparse multi-head attention (Child et al., 2019; sliding window).

    pattern: "local" (the last `window` tokens), "strided" (the last `window` tokens plus every
    `stride`-th earlier token) or "fixed" (the own block of `stride` tokens plus the last `summary`
    tokens of every earlier block). combine: "union" gives every head both sets, "split" gives the
    first half of the heads A1 and the others A2. backend: "block_sparse" gathers only the active
    key blocks of every `block_size` queries (O(T w d) for a window w); "dense_reference"
    materialises the T x T mask (the test reference). A cache always uses per-query gathers.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_heads: int = 4,
        pattern: str = "local",
        window: int = 128,
        stride: int = 128,
        summary: int = 16,
        combine: str = "union",
        block_size: int = 64,
        backend: str = "block_sparse",
        dropout: float = 0.0,
        bias: bool = False,
        rotary: RotaryEmbedding | None = None,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        _validate(d_model, num_heads, pattern, window, stride, summary, combine, block_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}; choose one of {list(BACKENDS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.pattern, self.window, self.stride, self.summary = pattern, window, stride, summary
        self.combine, self.block_size = combine, block_size
        self.backend, self.dropout = backend, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # scaled at init by the model
        self.rotary = rotary
        self.groups = self._head_groups()  # [(first head, end head, mask part, keys)]

    def _head_groups(self) -> list[tuple[int, int, str, KeySet]]:
        H, w, l, c = self.num_heads, self.window, self.stride, self.summary
        band = KeySet("band", None, w, l, c)
        if self.pattern == "local":
            return [(0, H, "all", band)]
        if self.pattern == "strided":
            # Union: strided keys inside the band are band keys already, so the far part starts
            # at m = ceil(w / l) strides back.
            first, second = band, KeySet(None, "stride", 1, l, c, skip=0)
            union = KeySet("band", "stride", w, l, c, skip=-(-w // l))
        else:
            first, second = (
                KeySet("block", None, l, l, c),
                KeySet("block_summary", "summary", l, l, c),
            )
            union = KeySet("block", "summary", l, l, c)
        if self.combine == "union":
            return [(0, H, "all", union)]
        return [(0, H // 2, "first", first), (H // 2, H, "second", second)]

    def forward(self, x: Tensor, cache: SparseCache | None = None) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, T, D]
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))  # each [B, H, T, Dh]
        offset = 0 if cache is None else cache.length
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        dropout = self.dropout if self.training else 0.0
        if cache is not None:
            y = self._decode(q, k, v, cache, dropout)
        elif self.backend == "dense_reference":
            y = self._dense(q, k, v, dropout)
        else:
            opts = dict(block_size=self.block_size, scale=self.scale, dropout_p=dropout)
            parts = [
                sparse_attention(q[:, h0:h1], k[:, h0:h1], v[:, h0:h1], keys, **opts)
                for h0, h1, _, keys in self.groups
            ]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [B, H, T, Dh]
        return self.out_proj(merge_heads(y.to(q.dtype)))  # [B, T, D]

    def _dense(self, q: Tensor, k: Tensor, v: Tensor, dropout: float) -> Tensor:
        """The reference: materialised [T, T] scores and the paper's boolean mask."""
        T = q.shape[2]
        pos = torch.arange(T, device=q.device)
        opts = dict(pattern=self.pattern, window=self.window, stride=self.stride)
        masks = [
            pattern_mask(
                pos[:, None], pos[None, :], summary=self.summary, part=part, **opts
            ).expand(h1 - h0, T, T)
            for h0, h1, part, _ in self.groups
        ]
        mask = torch.cat(masks)  # [H, T, T]
        with torch.autocast(q.device.type, enabled=False):
            s = q.float() @ k.float().transpose(-1, -2) * self.scale  # [B, H, T, T]
            s = s.masked_fill(~mask, float("-inf"))
            p = F.dropout(s.softmax(dim=-1), p=dropout, training=dropout > 0)  # [B, H, T, T]
            return p @ v.float()  # [B, H, T, Dh]

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, cache: SparseCache, dropout: float):
        """Write the new keys chunk by chunk and let every query gather the keys it sees."""
        B, _, T, _ = q.shape
        if cache.k.shape[0] != B:
            raise ValueError(f"cache has batch size {cache.k.shape[0]}, input has {B}")
        if cache.length + T > cache.max_len:
            raise ValueError(
                f"sparse cache overflow: {cache.length} cached + {T} new tokens exceed "
                f"max_len={cache.max_len}; create it with init_cache(batch_size, max_len>="
                f"{cache.length + T})"
            )
        out = []
        for t0 in range(0, T, cache.chunk):
            t1 = min(T, t0 + cache.chunk)
            pos = torch.arange(cache.length, cache.length + t1 - t0, device=q.device)
            cache.write(k[:, :, t0:t1], v[:, :, t0:t1])
            heads = [
                self._gathered(q[:, h0:h1, t0:t1], cache, h0, h1, keys, pos, dropout)
                for h0, h1, _, keys in self.groups
            ]
            out.append(heads[0] if len(heads) == 1 else torch.cat(heads, dim=1))  # [B,H,t,Dh]
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)  # [B, H, T, Dh]

    def _gathered(self, q, cache: SparseCache, h0: int, h1: int, keys: KeySet, pos, dropout):
        """Queries at positions `pos` [t] attend their keys gathered from the cache."""
        i = pos[:, None]  # [t, 1]
        ring = (cache.k[:, h0:h1], cache.v[:, h0:h1])
        gathered_k, gathered_v, visible = [], [], []

        def take(store: tuple[Tensor, Tensor], idx: Tensor, ok: Tensor) -> None:
            gathered_k.append(store[0][:, :, idx])  # [B, h, t, K, Dh]
            gathered_v.append(store[1][:, :, idx])
            visible.append(ok)  # [t, K]

        if keys.near is not None:
            j = i - torch.arange(keys.width, device=pos.device)  # [t, width]
            take(ring, j.clamp(min=0) % cache.capacity, keys.near_allowed(i, j) & (j >= 0))
        last = int(pos[-1])
        if keys.far == "stride" and last // keys.stride + 1 > keys.skip:
            m = torch.arange(keys.skip, last // keys.stride + 1, device=pos.device)
            j = i - m * keys.stride  # [t, M]
            take(ring, j.clamp(min=0) % cache.capacity, j >= 0)
        if keys.far == "summary" and last >= keys.stride:
            s = torch.arange(last // keys.stride * keys.summary, device=pos.device)
            idx = s.expand(len(pos), -1)  # [t, S]
            summary = (cache.summary_k[:, h0:h1], cache.summary_v[:, h0:h1])
            take(summary, idx, s // keys.summary < i // keys.stride)
        if len(visible) > 1:
            gathered_k = [torch.cat(gathered_k, dim=3)]  # [B, h, t, K, Dh]
            gathered_v = [torch.cat(gathered_v, dim=3)]
            visible = [torch.cat(visible, dim=1)]  # [t, K]
        return gather_attention(
            q, gathered_k[0], gathered_v[0], visible[0], scale=self.scale, dropout_p=dropout
        )

    def _reach(self) -> int | None:
        """Past positions the near parts read from the ring; None: every key (strided)."""
        if any(keys.far == "stride" for *_, keys in self.groups):
            return None
        return max(keys.width - 1 for *_, keys in self.groups if keys.near is not None)

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rollback: int = ROLLBACK,
    ) -> SparseCache:
        """An empty cache for `batch_size` rows and up to `max_len` tokens.

        `local` and `fixed` keep a ring of (window or stride) - 1 + rollback positions, whatever
        max_len is; `crop` can go back up to `rollback` tokens.
        """
        if batch_size < 1 or max_len < 1 or rollback < 1:
            raise ValueError(
                f"batch_size={batch_size}, max_len={max_len} and rollback={rollback} must be >= 1"
            )
        weight = self.qkv.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        reach = self._reach()
        capacity = max_len if reach is None else min(max_len, reach + rollback)
        shape = (batch_size, self.num_heads, capacity, self.head_dim)
        summary_k = summary_v = None
        if self.pattern == "fixed":
            summary_shape = (*shape[:2], -(-max_len // self.stride) * self.summary, shape[3])
            summary_k = torch.zeros(summary_shape, device=device, dtype=dtype)
            summary_v = torch.zeros(summary_shape, device=device, dtype=dtype)
        return SparseCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            summary_k=summary_k,
            summary_v=summary_v,
            max_len=max_len,
            reach=max_len if reach is None else reach,
            stride=self.stride,
            summary=self.summary,
        )

    def mixing_flops(self, seq_len: int) -> float:
        """q k^T and p v over the keys the pattern allows (4 d per key and query, counted from
        the mask itself), not over whole blocks: the useful work, as for dense attention."""
        pattern = (self.pattern, self.window, self.stride, self.summary)
        allowed = sum(  # (head, query, key) triples the heads attend
            (h1 - h0) * allowed_pairs(*pattern, part, seq_len) for h0, h1, part, _ in self.groups
        )
        return 4 * self.head_dim * allowed / seq_len

    def state_size(self, seq_len: int) -> int:
        """Numbers held in a default cache after seq_len tokens (keys and values of every head)."""
        reach = self._reach()
        held = seq_len if reach is None else min(seq_len, reach + ROLLBACK)
        if self.pattern == "fixed":
            l, c = self.stride, self.summary
            held += seq_len // l * c + max(0, seq_len % l - (l - c))
        return 2 * self.num_heads * self.head_dim * held


def _validate(d_model, num_heads, pattern, window, stride, summary, combine, block_size) -> None:
    check_heads(d_model, num_heads)
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r}; choose one of {list(PATTERNS)}")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}; choose one of {list(COMBINES)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    if combine == "split" and pattern == "local":
        raise ValueError("combine='split' needs pattern 'strided' or 'fixed'; local has one set")
    if combine == "split" and num_heads < 2:
        raise ValueError(
            f"combine='split' gives each key set half of the heads, so num_heads={num_heads} "
            "must be >= 2; use combine='union'"
        )
    if pattern == "local":
        return
    if stride < 2:
        raise ValueError(
            f"stride={stride} must be >= 2 for pattern={pattern!r} (stride 1 sees every position)"
        )
    if pattern == "strided" and window < stride:
        raise ValueError(
            f"window={window} is smaller than stride={stride}, so some earlier positions are not "
            "reachable in two hops; use window >= stride"
        )
    if pattern == "fixed" and not 1 <= summary < stride:
        raise ValueError(
            f"summary={summary} must be in [1, stride={stride}) for pattern='fixed'; "
            "lower summary or raise stride"
        )
