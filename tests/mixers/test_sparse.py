"""SparseAttention: block-sparse path and decoding cache against the dense masked reference, the
mask builder against the paper's sets, and every path against naive attention over those sets."""

from __future__ import annotations

import math

import pytest
import torch
from support import run_in_pieces
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from lmkit.mixers.block_sparse import near_layouts
from lmkit.mixers.sparse import SparseAttention, pattern_mask
from lmkit.ops.rotary import RotaryEmbedding

D_MODEL, NUM_HEADS = 32, 4
FP32 = dict(atol=1e-5, rtol=1e-5)

# Small windows, strides and blocks so that T = 19 / 40 crosses many blocks and pattern periods.
PATTERNS = {
    "local-w5": dict(pattern="local", window=5),
    "local-w1": dict(pattern="local", window=1),
    "strided-w6-l4": dict(pattern="strided", window=6, stride=4),
    "strided-w4-l4": dict(pattern="strided", window=4, stride=4),
    "strided-split-w5-l5": dict(pattern="strided", window=5, stride=5, combine="split"),
    "fixed-l6-c2": dict(pattern="fixed", stride=6, summary=2),
    "fixed-split-l5-c1": dict(pattern="fixed", stride=5, summary=1, combine="split"),
}


def pair(block_size: int = 4, **options) -> tuple[SparseAttention, SparseAttention]:
    """The block-sparse mixer and the dense reference with the same weights."""
    fast = SparseAttention(D_MODEL, num_heads=NUM_HEADS, block_size=block_size, **options)
    ref = SparseAttention(
        D_MODEL, num_heads=NUM_HEADS, block_size=block_size, backend="dense_reference", **options
    )
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("options", PATTERNS.values(), ids=PATTERNS.keys())
@pytest.mark.parametrize("T,block", [(1, 4), (19, 4), (40, 7), (40, 64)], ids=lambda v: str(v))
def test_block_sparse_equals_dense_reference(options, T, block):
    """Outputs and every gradient (input and weights) match in fp32, T not a multiple of block."""
    fast, ref = pair(block, **options)
    x = torch.randn(2, T, D_MODEL, requires_grad=True)
    g = torch.randn(2, T, D_MODEL)
    y, y_ref = fast(x), ref(x)
    assert_close(y, y_ref, **FP32)
    params = [x, *fast.parameters()]
    grads = torch.autograd.grad((y * g).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *ref.parameters()])
    for a, b in zip(grads, grads_ref, strict=True):
        assert_close(a, b, **FP32)


@pytest.mark.parametrize("options", PATTERNS.values(), ids=PATTERNS.keys())
def test_cache_equals_parallel_with_ring_wraparound(options):
    """Prefill longer than the rollback (chunked writes), uneven steps, the ring wraps; rope."""
    torch.manual_seed(0)
    mixer = SparseAttention(
        D_MODEL, num_heads=NUM_HEADS, block_size=4, rotary=RotaryEmbedding(8), **options
    ).eval()
    T = 40
    x = torch.randn(2, T, D_MODEL)
    full = mixer(x)
    cache = mixer.init_cache(2, T, rollback=2)
    out, pos = [], 0
    for n in (9, 1, 3, 1, 26):
        out.append(mixer(x[:, pos : pos + n], cache))
        pos += n
    assert cache.length == T
    assert_close(torch.cat(out, 1), full, **FP32)


@pytest.mark.parametrize("options", PATTERNS.values(), ids=PATTERNS.keys())
def test_causal(options):
    mixer = SparseAttention(D_MODEL, num_heads=NUM_HEADS, block_size=4, **options).eval()
    x = torch.randn(2, 40, D_MODEL)
    for t in (0, 3, 4, 17, 30):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        assert_close(mixer(x)[:, : t + 1], mixer(x2)[:, : t + 1], atol=1e-6, rtol=0)


def test_local_output_depends_only_on_the_window():
    w = 5
    mixer = SparseAttention(D_MODEL, num_heads=NUM_HEADS, window=w, block_size=4).eval()
    x = torch.randn(1, 30, D_MODEL)
    p = 11
    x2 = x.clone()
    x2[:, p] += 1.0
    changed = (mixer(x) - mixer(x2)).abs().amax(dim=(0, 2)) > 0  # [T]
    assert changed.nonzero().flatten().tolist() == list(range(p, p + w))


@pytest.mark.parametrize(
    "options",
    [PATTERNS["strided-w6-l4"], PATTERNS["fixed-l6-c2"], PATTERNS["fixed-split-l5-c1"]],
    ids=["strided", "fixed", "fixed-split"],
)
def test_select_and_crop(options):
    mixer = SparseAttention(D_MODEL, num_heads=NUM_HEADS, block_size=4, **options).eval()
    x = torch.randn(3, 30, D_MODEL)
    rows = torch.tensor([2, 0, 2])
    cache = mixer.init_cache(3, 30, rollback=4)
    mixer(x[:, :20], cache)
    cache.select(rows)
    assert_close(mixer(x[rows, 20:26], cache), mixer(x[rows])[:, 20:26], **FP32)
    cache.crop(23)  # back 3 tokens (<= rollback): the ring still holds what they need
    assert_close(mixer(x[rows, 23:], cache), mixer(x[rows])[:, 23:], **FP32)


def test_local_ring_is_bounded_and_crop_beyond_rollback_says_so():
    w, rollback = 5, 3
    mixer = SparseAttention(D_MODEL, num_heads=NUM_HEADS, window=w, block_size=4).eval()
    x = torch.randn(1, 200, D_MODEL)
    cache = mixer.init_cache(1, 100_000, rollback=rollback)
    assert cache.k.shape[2] == w - 1 + rollback  # independent of max_len
    ys = [mixer(x[:, t : t + 1], cache) for t in range(200)]
    assert cache.k.shape[2] == w - 1 + rollback and cache.length == 200
    assert_close(torch.cat(ys, 1), mixer(x), **FP32)
    with pytest.raises(ValueError, match="rollback>=4"):
        cache.crop(196)
    cache.crop(197)
    assert_close(mixer(x[:, 197:], cache), mixer(x)[:, 197:], **FP32)
    assert mixer.state_size(10**6) == 2 * D_MODEL * (w - 1 + 64)


def test_cache_overflow_and_batch_errors():
    mixer = SparseAttention(D_MODEL, num_heads=NUM_HEADS, window=4).eval()
    cache = mixer.init_cache(2, 10)
    with pytest.raises(ValueError, match="max_len>=11"):
        mixer(torch.randn(2, 11, D_MODEL), cache)
    with pytest.raises(ValueError, match="batch size 2"):
        mixer(torch.randn(3, 1, D_MODEL), cache)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "options",
    [
        dict(pattern="local", window=16),
        dict(pattern="strided", window=32, stride=32),
        dict(pattern="fixed", stride=32, summary=4),
    ],
    ids=["local", "strided", "fixed"],
)
def test_block_sparse_never_allocates_dense_scores(options):
    """Forward + backward at T = 1024: no tensor comes near the B * H * T * T dense scores."""
    B, T = 1, 1024
    fast, ref = pair(16, **options)
    x = torch.randn(B, T, D_MODEL, requires_grad=True)
    with _LargestTensor() as probe:
        fast(x).square().mean().backward()
    assert probe.largest < B * NUM_HEADS * T * T / 8, probe.largest
    with _LargestTensor() as probe:  # the probe does see a dense path
        ref(x[:, :256]).square().mean().backward()
    assert probe.largest >= B * NUM_HEADS * 256 * 256


def test_band_layout_gathers_a_fixed_number_of_keys_per_query():
    """The work per query is ceil((w - 1) / b) + 1 key blocks whatever T is."""
    keys = SparseAttention(D_MODEL, window=128, block_size=64).groups[0][3]
    for T in (256, 4096):
        (layout,) = near_layouts(keys, T, 64, torch.device("cpu"))
        assert layout.keys_per_query == (math.ceil(127 / 64) + 1) * 64
        assert layout.edge_cols == ((0, 64), (128, 192))  # the middle block is never masked


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_every_position_is_reachable_in_two_hops(pattern):
    T, l = 50, 7
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    opts = dict(pattern=pattern, window=l, stride=l, summary=2)
    union = pattern_mask(i, j, part="all", **opts).float()
    assert torch.equal((union @ union) > 0, j <= i)
    for part in ("all", "first", "second"):
        assert pattern_mask(i, j, part=part, **opts).diagonal().all()  # no empty row
    if pattern == "strided":
        assert int(union.sum(1).max()) <= l + math.ceil(T / l)


def paper_mask(T, *, pattern, window=1, stride=2, summary=1, part="all"):
    """[T, T] bool built set by set, query by query, from the Sparse Transformer's definitions
    (Child et al., 2019, section 4.2; independent of `pattern_mask`). A1 and A2 per query i:
    local: A1 = the last `window` positions i - window + 1 .. i (no A2).
    strided: A1 = the same band; A2 = i, i - stride, i - 2 stride, ... down to 0.
    fixed: A1 = i's own block of `stride` positions up to i; A2 = the last `summary` positions
    of every block (b stride + stride - summary .. b stride + stride - 1), up to i.
    part: "all" = A1 | A2 (one head sees both), "first" = A1, "second" = A2 plus i itself."""
    mask = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        if pattern == "fixed":
            a1 = set(range(i - i % stride, i + 1))
            a2 = {
                b * stride + u
                for b in range(i // stride + 1)
                for u in range(stride - summary, stride)
                if b * stride + u <= i
            }
        else:
            a1 = set(range(max(0, i - window + 1), i + 1))
            a2 = set(range(i, -1, -stride)) if pattern == "strided" else set()
        keys = {"all": a1 | a2, "first": a1, "second": a2 | {i}}[part]
        for j in keys:
            mask[i, j] = True
    return mask


MASK_CASES = {  # (T, options): T = 1, windows 1 and > T, stride > T, summary 1 and stride - 1
    "local-T1": (1, dict(pattern="local", window=1)),
    "local-w1": (9, dict(pattern="local", window=1)),
    "local-w4": (9, dict(pattern="local", window=4)),
    "local-w-over-T": (9, dict(pattern="local", window=20)),
    "strided-w4-l4": (23, dict(pattern="strided", window=4, stride=4)),
    "strided-w6-l4": (23, dict(pattern="strided", window=6, stride=4)),
    "strided-w9-l3": (24, dict(pattern="strided", window=9, stride=3)),
    "strided-w7-l2": (24, dict(pattern="strided", window=7, stride=2)),
    "strided-l-over-T": (5, dict(pattern="strided", window=8, stride=8)),
    "fixed-l6-c2": (23, dict(pattern="fixed", stride=6, summary=2)),
    "fixed-l6-c5-T-multiple": (24, dict(pattern="fixed", stride=6, summary=5)),
    "fixed-l5-c1": (23, dict(pattern="fixed", stride=5, summary=1)),
    "fixed-l2-c1": (9, dict(pattern="fixed", stride=2, summary=1)),
    "fixed-l-over-T": (4, dict(pattern="fixed", stride=8, summary=3)),
    "fixed-T1": (1, dict(pattern="fixed", stride=2, summary=1)),
}


@pytest.mark.parametrize("part", ["all", "first", "second"])
@pytest.mark.parametrize("T,options", MASK_CASES.values(), ids=MASK_CASES.keys())
def test_pattern_mask_matches_the_paper_sets(T, options, part):
    full = dict(window=1, stride=2, summary=1) | options
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    got = pattern_mask(i, j, part=part, **full)
    want = paper_mask(T, part="all" if options["pattern"] == "local" else part, **full)
    wrong = (got != want).nonzero().tolist()
    assert not wrong, f"pattern_mask differs from the paper at (query, key) {wrong[:5]}"


def paper_rotate(x, pos, base):
    """RoFormer rotation of x [..., T, Dh] at positions pos [T] (channel m paired with m + Dh / 2,
    turned by pos * base^(-2m / Dh))."""
    half = x.shape[-1] // 2
    angle = pos[:, None] * base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


@torch.no_grad()
def naive_sparse_attention(mixer, x):
    """Softmax attention in float64 with every head's [T, T] mask from `paper_mask`: "union" (and
    local) gives every head A1 | A2, "split" gives the first half of the heads A1 and the others A2
    (plus the diagonal)."""
    B, T, D = x.shape
    H = mixer.num_heads
    bias = None if mixer.qkv.bias is None else mixer.qkv.bias.double()
    qkv = torch.nn.functional.linear(x.double(), mixer.qkv.weight.double(), bias)
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in qkv.split(D, -1))  # [B,H,T,Dh]
    if mixer.rotary is not None:
        pos = torch.arange(T, dtype=torch.float64)
        q, k = paper_rotate(q, pos, mixer.rotary.base), paper_rotate(k, pos, mixer.rotary.base)
    opts = dict(
        pattern=mixer.pattern, window=mixer.window, stride=mixer.stride, summary=mixer.summary
    )
    split = mixer.combine == "split" and mixer.pattern != "local"
    parts = [("first" if h < H // 2 else "second") if split else "all" for h in range(H)]
    mask = torch.stack([paper_mask(T, part=part, **opts) for part in parts])  # [H, T, T]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
    y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # [B, H, T, Dh]
    bias = None if mixer.out_proj.bias is None else mixer.out_proj.bias.double()
    y = y.transpose(1, 2).reshape(B, T, D)
    return torch.nn.functional.linear(y, mixer.out_proj.weight.double(), bias)


REFERENCE_PATTERNS = {**PATTERNS, "fixed-l6-c2-rope": dict(pattern="fixed", stride=6, summary=2)}


@pytest.mark.parametrize("path", ["block_sparse", "dense_reference", "cached"])
@pytest.mark.parametrize("name", REFERENCE_PATTERNS.keys())
def test_outputs_match_naive_attention_with_the_paper_mask(name, path):
    """Both backends and cached decoding against plain softmax attention over the mask built from
    the paper's sets, so the dense reference is not checked with the mask builder it uses."""
    torch.manual_seed(0)
    rotary = RotaryEmbedding(D_MODEL // NUM_HEADS) if name.endswith("rope") else None
    backend = "dense_reference" if path == "dense_reference" else "block_sparse"
    mixer = SparseAttention(
        D_MODEL,
        num_heads=NUM_HEADS,
        block_size=4,
        backend=backend,
        rotary=rotary,
        **REFERENCE_PATTERNS[name],
    ).eval()
    x = torch.randn(2, 23, D_MODEL)
    if path == "cached":
        y = run_in_pieces(mixer, x, mixer.init_cache(2, 23, rollback=2), (9, 1, 1, 7, 1, 4))
    else:
        y = mixer(x)
    assert_close(y.double(), naive_sparse_attention(mixer, x), **FP32)


def test_bf16_error_matches_the_dense_reference():
    """Under bf16 autocast the block-sparse error vs fp32 is that of the dense reference."""
    fast, ref = pair(4, pattern="fixed", stride=6, summary=2)
    x = torch.randn(2, 40, D_MODEL)
    exact = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast, y_ref = fast(x), ref(x)
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    err_fast = (y_fast.float() - exact).abs().max()
    err_ref = (y_ref.float() - exact).abs().max()
    assert err_fast <= 2 * err_ref + 1e-3, (err_fast, err_ref)


def test_dropout_trains_and_is_off_in_eval():
    mixer = SparseAttention(D_MODEL, num_heads=NUM_HEADS, window=6, block_size=4, dropout=0.5)
    x = torch.randn(2, 19, D_MODEL)
    assert not torch.equal(mixer(x), mixer(x))
    mixer.eval()
    assert torch.equal(mixer(x), mixer(x))


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(num_heads=3), "divisible by num_heads=3"),
        (dict(pattern="axial"), "pattern='axial'; choose one of"),
        (dict(combine="both"), "combine='both'; choose one of"),
        (dict(backend="flex"), "backend='flex'; choose one of"),
        (dict(window=0), "window=0 must be >= 1"),
        (dict(block_size=0), "block_size=0 must be >= 1"),
        (dict(dropout=1.0), "dropout=1.0 must be in"),
        (dict(combine="split"), "needs pattern 'strided' or 'fixed'"),
        (dict(pattern="strided", stride=1, window=4), "stride=1 must be >= 2"),
        (dict(pattern="strided", window=8, stride=16), "window=8 is smaller than stride=16"),
        (dict(pattern="fixed", stride=8, summary=8), r"summary=8 must be in \[1, stride=8\)"),
        (dict(pattern="fixed", stride=8, summary=0), "summary=0 must be in"),
    ],
)
def test_bad_options_fail_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SparseAttention(D_MODEL, **options)


def test_split_needs_two_heads():
    with pytest.raises(ValueError, match="num_heads=1 must be >= 2"):
        SparseAttention(D_MODEL, num_heads=1, pattern="strided", combine="split")
