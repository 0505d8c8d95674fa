"""SoftmaxAttention and the tiled online-softmax path against a materialised reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from lmkit.mixers.softmax import BACKENDS, KVCache, SoftmaxAttention
from lmkit.mixers.tiled_attention import tiled_attention, tiled_attention_forward
from lmkit.ops.rotary import RotaryEmbedding

D_MODEL, NUM_HEADS = 32, 4
FP32 = dict(atol=1e-5, rtol=1e-5)


def reference(q, k, v, causal=True, upcast=True):
    """Materialised attention: returns (o, lse). Fully masked rows give o = 0, lse = -inf.

    upcast=False keeps the matmuls in the input dtype (softmax still in float32), the usual
    low-precision reference of the flash-attention tests.
    """
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # [B, H, Tq, Tk]
    if causal:
        visible = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
        s = s.masked_fill(~visible, float("-inf"))
    empty = (s == float("-inf")).all(dim=-1, keepdim=True)  # [B, H, Tq, 1]
    p = s.softmax(dim=-1).masked_fill(empty, 0.0)
    return (p.to(v.dtype) @ v).to(q.dtype), torch.logsumexp(s, dim=-1)


def qkv(Tq, Tk, Dh, B=2, H=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, H, Tq, Dh), (B, H, Tk, Dh), (B, H, Tk, Dh))
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


# (Tq, Tk, Dh, tile_size, causal)
CASES = {
    "T257-d64-tile32-causal": (257, 257, 64, 32, True),
    "T257-d64-tile32-full": (257, 257, 64, 32, False),
    "T1-tile16": (1, 1, 16, 16, True),
    "Tq1-Tk37-decode-tile8": (1, 37, 16, 8, True),
    "Tq13-Tk40-tile16": (13, 40, 16, 16, True),
    "Tq13-Tk40-tile16-full": (13, 40, 16, 16, False),
    "Tq40-Tk13-empty-rows-tile8": (40, 13, 16, 8, True),
    "T33-tile1": (33, 33, 16, 1, True),
    "T50-tile16": (50, 50, 16, 16, True),
    "T50-tile64-ge-T": (50, 50, 16, 64, True),
}


@pytest.mark.parametrize("Tq,Tk,Dh,tile,causal", CASES.values(), ids=CASES.keys())
def test_tiled_forward_matches_reference(Tq, Tk, Dh, tile, causal):
    q, k, v = qkv(Tq, Tk, Dh)
    o, lse = tiled_attention_forward(q, k, v, causal=causal, tile_size=tile)
    o_ref, lse_ref = reference(q, k, v, causal)
    assert o.dtype == q.dtype and o.shape == o_ref.shape
    assert_close(o, o_ref, **FP32)
    assert_close(lse, lse_ref, **FP32)  # -inf rows must match too
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("Tq,Tk,Dh,tile,causal", CASES.values(), ids=CASES.keys())
def test_tiled_gradients_match_reference(Tq, Tk, Dh, tile, causal):
    q, k, v = qkv(Tq, Tk, Dh)
    g = torch.Generator().manual_seed(1)
    do, dlse = torch.randn(2, 3, Tq, Dh, generator=g), torch.randn(2, 3, Tq, generator=g)

    def loss(o, lse):  # a gradient on lse exercises the dlse term of the backward
        return (o * do).sum() + (torch.where(lse.isfinite(), lse, 0.0) * dlse).sum()

    grads = torch.autograd.grad(
        loss(*tiled_attention_forward(q, k, v, causal=causal, tile_size=tile)), (q, k, v)
    )
    grads_ref = torch.autograd.grad(loss(*reference(q, k, v, causal)), (q, k, v))
    for name, got, want in zip("qkv", grads, grads_ref, strict=True):
        assert_close(got, want, **FP32, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize(
    "Tq,Tk,tile,causal",
    [(5, 7, 2, True), (6, 6, 4, True), (6, 6, 4, False), (7, 4, 3, True)],
    ids=["Tq5-Tk7-causal", "T6-causal", "T6-full", "Tq7-Tk4-empty-rows"],
)
def test_tiled_gradcheck_float64(Tq, Tk, tile, causal):
    q, k, v = qkv(Tq, Tk, 4, B=1, H=2, dtype=torch.float64)
    with_lse = Tq <= Tk  # lse = -inf on empty rows has no finite difference

    def fn(q, k, v):
        o, lse = tiled_attention_forward(q, k, v, causal=causal, tile_size=tile)
        return (o, lse) if with_lse else o

    assert torch.autograd.gradcheck(fn, (q, k, v))


SKIP_CASES = {  # (Tq, Tk, causal, key tiles visited per pass) with tile_size 16
    "T64-causal": (64, 64, True, 1 + 2 + 3 + 4),
    "T64-full": (64, 64, False, 16),
    "Tq16-Tk64-causal": (16, 64, True, 4),
    "Tq64-Tk16-causal": (64, 16, True, 1),  # the first three query tiles see no key at all
}


@pytest.mark.parametrize("Tq,Tk,causal,visited", SKIP_CASES.values(), ids=SKIP_CASES.keys())
def test_tiled_skips_masked_key_tiles(monkeypatch, Tq, Tk, causal, visited):
    import lmkit.mixers.tiled_attention as module

    calls, scores = [], module._scores
    monkeypatch.setattr(module, "_scores", lambda *args: calls.append(args[2:4]) or scores(*args))
    q, k, v = qkv(Tq, Tk, 8)
    tiled_attention(q, k, v, causal=causal, tile_size=16).sum().backward()
    assert len(calls) == 2 * visited  # forward, then the recomputing backward


def test_tiled_bf16_error_within_maintainers_rule():
    # flash-attention #145/#366: the fast path's bf16 error may be a small factor of the
    # reference's own bf16 error, both measured against the fp32 reference on the same inputs.
    q, k, v = qkv(200, 200, 64, B=2, H=4, dtype=torch.bfloat16)
    do = torch.randn(2, 4, 200, 64, generator=torch.Generator().manual_seed(2))
    outs = {
        "fp32": reference(q, k, v, upcast=True)[0],
        "naive": reference(q, k, v, upcast=False)[0],
        "tiled": tiled_attention(q, k, v, tile_size=32),
    }
    assert outs["tiled"].dtype == torch.bfloat16
    for name in ("naive", "tiled"):  # grads of each path, in the path's own dtype
        outs[name + "_grads"] = torch.autograd.grad((outs[name].float() * do).sum(), (q, k, v))
    outs["fp32_grads"] = torch.autograd.grad((outs["fp32"] * do).sum(), (q, k, v))

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert err(outs["tiled"], outs["fp32"]) <= 3 * err(outs["naive"], outs["fp32"]) + 1e-4
    for got, base, want in zip(
        outs["tiled_grads"], outs["naive_grads"], outs["fp32_grads"], strict=True
    ):
        assert err(got, want) <= 3 * err(base, want) + 1e-4


def _saved_bytes(fn, T):
    """Bytes of the tensors autograd saves for backward during fn's forward (then runs backward)."""
    q, k, v = qkv(T, T, 32, B=1, H=2)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = fn(q, k, v)
    o.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    return total


def test_tiled_saved_memory_linear_naive_quadratic():
    tiled = {
        T: _saved_bytes(lambda q, k, v: tiled_attention(q, k, v, tile_size=128), T)
        for T in (256, 512, 1024)
    }
    naive = {T: _saved_bytes(lambda q, k, v: reference(q, k, v)[0], T) for T in (256, 512, 1024)}
    assert tiled[256] > 0
    assert tiled[1024] / tiled[256] <= 4.5, tiled
    assert naive[1024] / naive[256] >= 12, naive
    assert tiled[1024] * 10 < naive[1024]


def _forward_peak_bytes(fn):
    """Peak of live CPU bytes torch allocates during fn(), from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:  # the raw allocation/free events are not part of the documented profiler API
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        sizes = [e.nbytes() for e in events]
    except AttributeError as error:
        pytest.skip(f"profiler memory events unavailable: {error}")
    if not sizes:
        pytest.skip("profiler recorded no CPU allocations")
    live = peak = 0
    for n in sizes:
        live += n
        peak = max(peak, live)
    return peak


def test_tiled_forward_peak_memory_far_below_naive():
    peaks = {}
    for T in (512, 2048):
        q, k, v = (t.detach() for t in qkv(T, T, 64, B=1, H=2))
        with torch.no_grad():
            tiled = _forward_peak_bytes(
                lambda q=q, k=k, v=v: tiled_attention(q, k, v, tile_size=128)
            )
            naive = _forward_peak_bytes(lambda q=q, k=k, v=v: reference(q, k, v)[0])
        peaks["tiled", T], peaks["naive", T] = tiled, naive
    assert peaks["tiled", 2048] * 10 < peaks["naive", 2048], peaks
    assert peaks["tiled", 2048] <= 4.5 * peaks["tiled", 512], peaks  # linear (+ tiles), not 16x
    assert peaks["naive", 2048] >= 12 * peaks["naive", 512], peaks


# ---------------------------------------------------------------- the mixer


def make(backend, rotary=False, seed=0, **kwargs):
    torch.manual_seed(seed)  # same seed -> same weights for every backend
    rope = RotaryEmbedding(D_MODEL // NUM_HEADS) if rotary else None
    tile = kwargs.pop("tile_size", 8)
    return SoftmaxAttention(
        D_MODEL, num_heads=NUM_HEADS, backend=backend, tile_size=tile, rotary=rope, **kwargs
    ).eval()


def inputs(B=2, T=19, seed=0):
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
def test_backends_agree(rotary):
    x = inputs(T=19)
    ys = {b: make(b, rotary)(x) for b in BACKENDS}
    assert ys["naive"].shape == x.shape and ys["naive"].dtype == x.dtype
    assert_close(ys["sdpa"], ys["naive"], **FP32)
    assert_close(ys["tiled"], ys["naive"], **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality_exact(backend):
    mixer, x = make(backend, rotary=True), inputs(T=35)
    y = mixer(x)
    for t in (0, 6, 7, 8, 15, 16, 33):  # tile_size 8: boundaries kC - 1, kC
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        assert torch.equal(mixer(x2)[:, : t + 1], y[:, : t + 1]), f"t={t}"


def run_cached(mixer, x, slices, cache):
    ys, start, length = [], 0, cache.length
    for n in slices:
        ys.append(mixer(x[:, start : start + n], cache))
        start += n
    assert cache.length == length + start
    return torch.cat(ys, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_decoding_equals_parallel(backend):
    mixer, x = make(backend, rotary=True), inputs(T=23)
    cache = mixer.init_cache(batch_size=2, max_len=23)  # exactly full at the end
    assert isinstance(cache, KVCache) and cache.length == 0
    y_cached = run_cached(mixer, x, [7, 3, 1, 5, 1, 6], cache)  # prefill, then uneven slices
    assert_close(y_cached, mixer(x), **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_rows_then_continue(backend):
    mixer, x = make(backend, rotary=True), inputs(B=3, T=15)
    cache = mixer.init_cache(batch_size=3, max_len=20)
    mixer(x[:, :9], cache)
    rows = torch.tensor([2, 0, 0, 1])  # reorder and repeat
    cache.select(rows)
    assert cache.k.shape[0] == 4 and cache.length == 9
    y_cont = run_cached(mixer, x[rows, 9:], [1, 5], cache)
    assert_close(y_cont, mixer(x[rows])[:, 9:], **FP32)  # the selected rows run alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_then_refeed(backend):
    mixer, x = make(backend, rotary=True), inputs(T=16)
    y_full = mixer(x)
    cache = mixer.init_cache(batch_size=2, max_len=16)
    mixer(x[:, :12], cache)
    cache.crop(5)
    assert cache.length == 5
    assert_close(run_cached(mixer, x[:, 5:], [4, 1, 6], cache), y_full[:, 5:], **FP32)
    for bad in (-1, 17):
        with pytest.raises(ValueError, match=f"length={bad}"):
            cache.crop(bad)


def test_cache_overflow_and_metadata():
    mixer = make("sdpa")
    cache = mixer.init_cache(batch_size=2, max_len=8)
    assert cache.k.shape == (2, NUM_HEADS, 8, D_MODEL // NUM_HEADS)
    assert cache.k.dtype == mixer.qkv.weight.dtype
    assert mixer.init_cache(1, 4, dtype=torch.bfloat16).v.dtype == torch.bfloat16
    mixer(inputs(T=5), cache)
    with pytest.raises(ValueError, match="max_len=8"):
        mixer(inputs(T=4), cache)
    assert mixer.state_size(10) == 2 * NUM_HEADS * 10 * (D_MODEL // NUM_HEADS)


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_dropout_only_in_training(backend):
    x = inputs(T=11)
    plain, dropped = make(backend), make(backend, dropout=0.5)
    assert_close(dropped(x), plain(x), **FP32)  # eval: no dropout
    dropped.train()
    assert not torch.allclose(dropped(x), plain(x))


BAD_OPTIONS = {
    "heads-not-dividing": (dict(d_model=130, num_heads=4), "d_model=130"),
    "unknown-backend": (dict(backend="flash"), "'flash'.*sdpa"),
    "tile-zero": (dict(tile_size=0), "tile_size=0"),
    "dropout-one": (dict(dropout=1.0), "dropout=1.0"),
    "dropout-negative": (dict(dropout=-0.1), "dropout=-0.1"),
    "tiled-with-dropout": (dict(backend="tiled", dropout=0.1), "dropout=0.1.*tiled"),
}


@pytest.mark.parametrize("options,match", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_raise(options, match):
    options = {"d_model": D_MODEL, **options}
    with pytest.raises(ValueError, match=match):
        SoftmaxAttention(options.pop("d_model"), **options)


def test_tiled_keeps_fp32_statistics_under_autocast():
    # Autocast must not turn the tile matmuls into bf16 ones: fp32 inputs under bf16 autocast
    # give the fp32 reference's result (bf16 tiles would be off by ~1e-2), forward and backward.
    q, k, v = qkv(150, 150, 32)
    expected = reference(q, k, v)[0]
    grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiled_attention(q, k, v, tile_size=32)
        autocast_grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert out.dtype == torch.float32
    assert_close(out, expected, **FP32)
    for g, ref in zip(autocast_grads, grads, strict=True):
        assert_close(g, ref, atol=1e-4, rtol=1e-4)


class KernelDtypes(TorchDispatchMode):
    """Records the query dtype of every SDPA kernel call (below autocast, so after its casts)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("T", [19, 170], ids=["short:fp32-sdpa", "long:bf16-sdpa"])
def test_sdpa_training_under_cpu_autocast_matches_naive(T):
    """Short sequences train SDPA in fp32 on CPU (the bf16 backward is slow there), long ones in
    bf16: both give the naive backend's outputs and gradients within bf16 error, in bf16."""
    from lmkit.mixers.softmax import CPU_BF16_SDPA_MIN_KEYS, cpu_bf16_backward_is_slow

    probe = torch.zeros(1, requires_grad=True, dtype=torch.bfloat16)
    assert cpu_bf16_backward_is_slow(probe, T) == (T < CPU_BF16_SDPA_MIN_KEYS)
    assert not cpu_bf16_backward_is_slow(probe.detach(), T)  # inference keeps bf16
    x = inputs(T=T)
    outs, grads, kernels = {}, {}, KernelDtypes()
    for backend in ("sdpa", "naive"):
        mixer = make(backend, rotary=True).train()
        with kernels, torch.autocast("cpu", dtype=torch.bfloat16):
            outs[backend] = mixer(x)
        outs[backend].float().square().mean().backward()
        grads[backend] = mixer.qkv.weight.grad
    # what the attention kernel itself received, after autocast's casts
    expected = torch.float32 if T < CPU_BF16_SDPA_MIN_KEYS else torch.bfloat16
    assert kernels.seen == [expected]
    assert outs["sdpa"].dtype == torch.bfloat16
    assert_close(outs["sdpa"].float(), outs["naive"].float(), atol=2e-2, rtol=2e-2)
    assert_close(grads["sdpa"], grads["naive"], atol=2e-2, rtol=5e-2)
