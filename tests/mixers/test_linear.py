"""LinearAttention: quadratic == chunk == recurrent, cache == parallel, gradients, options, and
every mode against the paper's formula computed pair by pair."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support import run_in_pieces

from lmkit.mixers.feature_maps import FEATURE_MAPS, taylor
from lmkit.mixers.linear import (
    MODES,
    LinearAttention,
    LinearCache,
    chunk_form,
    quadratic_form,
    recurrent_form,
)
from lmkit.ops.rotary import RotaryEmbedding

D_MODEL, NUM_HEADS = 32, 4


def assert_fp32_close(a, b, tol=1e-5):
    """ALGORITHMS.md's "fp32 1e-5": max |a - b| <= tol * max(1, max |b|)."""
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err:.3g}"


def features(B, H, T, Dk, Dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (FEATURE_MAPS["elu"].fn(torch.randn(B, H, T, Dk, generator=g)) for _ in range(2))
    v = torch.randn(B, H, T, Dv, generator=g)
    state = torch.rand(B, H, Dk, Dv, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, state)]


# (T, chunk_size, heads): T not a multiple of C, T = 1, C = 1, C >= T
FORMS = {
    "T1-H2-chunk8": (1, 8, 2),
    "T19-H4-chunk1": (19, 1, 4),
    "T19-H4-chunk8": (19, 8, 4),
    "T19-H1-chunk64-ge-T": (19, 64, 1),
    "T64-H3-chunk16-multiple": (64, 16, 3),
    "T257-H2-chunk64": (257, 64, 2),
}


@pytest.mark.parametrize("T,C,H", FORMS.values(), ids=FORMS.keys())
@pytest.mark.parametrize("initial", [False, True], ids=["zero-state", "initial-state"])
def test_three_forms_agree(T, C, H, initial):
    q, k, v, s0 = features(2, H, T, 16, 12)
    s0 = s0 if initial else None
    y_ref, s_ref = quadratic_form(q, k, v, s0)
    for y, s in (chunk_form(q, k, v, s0, chunk_size=C), recurrent_form(q, k, v, s0)):
        assert y.shape == y_ref.shape and s.shape == s_ref.shape
        assert_fp32_close(y, y_ref)
        assert_fp32_close(s, s_ref)


@pytest.mark.parametrize("T,C,H", FORMS.values(), ids=FORMS.keys())
def test_chunk_gradients_match_quadratic(T, C, H):
    q, k, v, s0 = features(2, H, T, 16, 12, seed=1)
    g = torch.Generator().manual_seed(2)
    dy, ds = torch.randn(2, H, T, 12, generator=g), torch.randn(2, H, 16, 12, generator=g)

    def grads(form, **kw):
        y, s = form(q, k, v, s0, **kw)
        return torch.autograd.grad((y * dy).sum() + (s * ds).sum(), (q, k, v, s0))

    for got, want in zip(grads(chunk_form, chunk_size=C), grads(quadratic_form), strict=True):
        assert_fp32_close(got, want)


def test_chunk_form_gradcheck_float64():
    q, k, v, s0 = features(1, 2, 7, 3, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: chunk_form(*t, chunk_size=3), (q, k, v, s0))


def pair(modes=("quadratic", "chunk", "recurrent"), **options):
    """One LinearAttention per mode with identical weights."""
    torch.manual_seed(0)
    first = LinearAttention(D_MODEL, num_heads=NUM_HEADS, mode=modes[0], **options)
    layers = [first]
    for mode in modes[1:]:
        layer = LinearAttention(D_MODEL, num_heads=NUM_HEADS, mode=mode, **options)
        layer.load_state_dict(first.state_dict())
        layers.append(layer)
    return layers


OPTIONS = {
    "elu": dict(),
    "relu": dict(feature_map="relu"),
    "taylor": dict(feature_map="taylor"),
    "identity-outnorm": dict(feature_map="identity", normalize=False),
    "elu-outnorm": dict(normalize=False),
    "elu-rope": dict(rotary=RotaryEmbedding(D_MODEL // NUM_HEADS)),
    "taylor-rope": dict(feature_map="taylor", rotary=RotaryEmbedding(D_MODEL // NUM_HEADS)),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_module_modes_agree(options):
    x = torch.randn(2, 37, D_MODEL)
    quadratic, chunk, recurrent = pair(chunk_size=8, **options)
    y = quadratic(x)
    assert_fp32_close(chunk(x), y)
    assert_fp32_close(recurrent(x), y)


# phi transcribed from the papers (independent of lmkit.mixers.feature_maps): elu(x) + 1
# (Katharopoulos et al., 2020, eq. 7), relu, the identity, and Based's second-order Taylor
# kernel (Arora et al., 2024), given by its value phi(q).phi(k) = 1 + s + s^2 / 2, s = q.k / sqrt d.
PAPER_PHI = {"elu": lambda x: F.elu(x) + 1.0, "relu": F.relu, "identity": lambda x: x}


def paper_kernel(name, q, k):
    """phi(q).phi(k) for q, k [..., Dh] -> [...]."""
    if name == "taylor":
        s = (q * k).sum(-1) / q.shape[-1] ** 0.5
        return 1.0 + s + s * s / 2.0
    return (PAPER_PHI[name](q) * PAPER_PHI[name](k)).sum(-1)


def paper_rotate(x, pos, base):
    """RoFormer rotation of x [..., Dh] at position pos (channel m paired with m + Dh / 2,
    turned by pos * base^(-2m / Dh))."""
    half = x.shape[-1] // 2
    angle = pos * base ** (-2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


@torch.no_grad()
def paper_reference(layer, x):
    """LinearAttention's output from Katharopoulos et al. (2020), eq. 4-6, in float64 with a loop
    over every (query i, key j <= i) pair: per head, with sim(q, k) = phi(q).phi(k),
    y_i = sum_j sim(q_i, k_j) v_j / (sum_j sim(q_i, k_j) + eps). normalize=False drops the
    denominator and RMS-normalises y_i over the head's channels (eps inside the root, gain
    out_norm.weight). Rotary (RoFormer eq. 19): the numerator uses R_i phi(q_i) . R_j phi(k_j),
    the denominator the unrotated features; maps that depend on q.k alone (taylor, identity) use
    sim(R_i q_i, R_j k_j) in both."""
    B, T, D = x.shape
    H, name, eps = layer.num_heads, layer.feature_map, layer.eps
    qkv = F.linear(x.double(), layer.qkv.weight.double(), _double(layer.qkv.bias))
    q, k, v = (t.reshape(B, T, H, D // H) for t in qkv.split(D, dim=-1))  # [B, T, H, Dh]
    rotary = layer.rotary
    base = None if rotary is None else rotary.base
    y = torch.zeros(B, T, H, D // H, dtype=torch.float64)
    for i in range(T):
        num = torch.zeros(B, H, D // H, dtype=torch.float64)
        den = torch.zeros(B, H, 1, dtype=torch.float64)
        for j in range(i + 1):
            qi, kj = q[:, i], k[:, j]  # [B, H, Dh]
            if rotary is not None and name in ("taylor", "identity"):
                qi, kj = paper_rotate(qi, i, base), paper_rotate(kj, j, base)
            sim = paper_kernel(name, qi, kj)[..., None]  # [B, H, 1]
            if rotary is not None and name in ("elu", "relu"):
                phi = PAPER_PHI[name]
                rotated = paper_rotate(phi(qi), i, base) * paper_rotate(phi(kj), j, base)
                num += rotated.sum(-1, keepdim=True) * v[:, j]
            else:
                num += sim * v[:, j]
            den += sim
        if layer.normalize:
            y[:, i] = num / (den + eps)
        else:
            rms = (num.square().mean(-1, keepdim=True) + eps).sqrt()
            y[:, i] = num / rms * layer.out_norm.weight.double()
    out_proj = layer.out_proj
    return F.linear(y.reshape(B, T, D), out_proj.weight.double(), _double(out_proj.bias))


def _double(t):
    return None if t is None else t.double()


REFERENCE_OPTIONS = {
    **OPTIONS,
    # eps = 0.5 makes its place visible: inside the denominator, or inside the RMS norm's root
    "elu-eps0.5": dict(eps=0.5),
    "relu-eps0.5-bias": dict(feature_map="relu", eps=0.5, bias=True),
    "elu-rope-eps0.5": dict(eps=0.5, rotary=RotaryEmbedding(D_MODEL // NUM_HEADS)),
    "elu-outnorm-eps0.5": dict(normalize=False, eps=0.5),
}


@pytest.mark.parametrize("mode", ["chunk", "quadratic", "recurrent", "cached"])
@pytest.mark.parametrize("options", REFERENCE_OPTIONS.values(), ids=REFERENCE_OPTIONS.keys())
def test_outputs_match_the_paper_reference(options, mode):
    """Every mode, and cached decoding, against the paper's formula computed pair by pair: the
    forms and the shared normaliser code (denominator column, eps, out_norm, rotary split) are
    checked against an independent computation, not against each other."""
    (layer,) = pair(modes=("chunk" if mode == "cached" else mode,), chunk_size=8, **options)
    if layer.out_norm is not None:
        with torch.no_grad():  # a gain other than 1, to check that it is applied per channel
            layer.out_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 21, D_MODEL)
    if mode == "cached":  # a prefill across chunks, single steps and a longer continuation
        y = run_in_pieces(layer, x, layer.init_cache(2, max_len=1), (9, 1, 1, 6, 1, 3))
    else:
        y = layer(x)
    assert_fp32_close(y.double(), paper_reference(layer, x))


def test_relu_rows_without_features_give_zero_not_nan():
    """relu(q) = 0 everywhere: the denominator is only eps and every output is exactly 0."""
    for mode in MODES:
        (layer,) = pair(modes=(mode,), feature_map="relu", chunk_size=4)
        with torch.no_grad():
            layer.qkv.weight[:D_MODEL] = 0.0  # q = 0
        y = layer(torch.randn(2, 9, D_MODEL))
        assert torch.equal(y, torch.zeros_like(y)), mode


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_cache_equals_parallel(options):
    (layer,) = pair(modes=("chunk",), chunk_size=4, **options)
    x = torch.randn(2, 23, D_MODEL)
    full = layer(x)
    cache = layer.init_cache(2, max_len=1)  # constant size: max_len is not a limit
    out, pos = [], 0
    for n in (9, 1, 1, 5, 3, 1, 3):  # prefill across chunks, then uneven continuations
        out.append(layer(x[:, pos : pos + n], cache))
        pos += n
    assert cache.length == 23
    assert_fp32_close(torch.cat(out, 1), full)


@pytest.mark.parametrize("t", [3, 4, 7, 8, 15])  # chunk boundaries kC - 1, kC
@pytest.mark.parametrize("mode", ["chunk", "quadratic"])
def test_causal_at_chunk_boundaries(mode, t):
    (layer,) = pair(modes=(mode,), chunk_size=4)
    x = torch.randn(2, 19, D_MODEL)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
    assert torch.equal(layer(x)[:, : t + 1], layer(x2)[:, : t + 1])


def test_decoding_state_does_not_grow():
    (layer,) = pair(modes=("chunk",))
    cache = layer.init_cache(1, 10)
    shapes = (cache.state.shape, cache.norm.shape)
    assert cache.state.dtype == cache.norm.dtype == torch.float32
    layer(torch.randn(1, 50, D_MODEL), cache)
    for _ in range(20):
        layer(torch.randn(1, 1, D_MODEL), cache)
    assert (cache.state.shape, cache.norm.shape) == shapes and cache.length == 70
    assert layer.state_size(10) == layer.state_size(10_000) == 4 * 8 * 9


def test_cache_select_and_crop():
    cache = LinearCache(state=torch.arange(3.0).view(3, 1, 1, 1), norm=torch.zeros(3, 1, 1))
    cache.length = 5
    cache.select(torch.tensor([2, 2, 0]))
    assert cache.state.flatten().tolist() == [2.0, 2.0, 0.0]
    cache.crop(5)  # unchanged length is fine
    with pytest.raises(ValueError, match="cannot be cropped to length=3; snapshot"):
        cache.crop(3)


def test_bf16_long_sequence_is_finite_and_states_stay_fp32():
    (layer,) = pair(modes=("chunk",))
    x = torch.randn(1, 4096, D_MODEL, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        cache = layer.init_cache(1, 4096, dtype=torch.bfloat16)
        layer(x[:, :4000].detach(), cache)
        step = layer(x[:, 4000:4001].detach(), cache)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(step.float()).all()
    assert cache.state.dtype == cache.norm.dtype == torch.float32
    # bf16 only in the projections: close to the fp32 output
    assert_fp32_close(y.float(), layer(x).detach(), tol=3e-2)


def test_elu_features_survive_very_negative_bf16_inputs():
    # elu(x) + 1 in bf16 is exactly 0 below about -8; features are computed in fp32.
    x = torch.full((4,), -12.0, dtype=torch.bfloat16)
    assert (FEATURE_MAPS["elu"].fn(x.float()) > 0).all()
    (layer,) = pair(modes=("chunk",))
    with torch.no_grad():
        layer.qkv.weight.mul_(200.0)  # push q, k far into the negative branch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 30, D_MODEL))
    assert torch.isfinite(y.float()).all()


def test_taylor_kernel_is_second_order_exp():
    q, k = torch.randn(6, 16), torch.randn(6, 16)
    s = (q * k).sum(-1) / 16**0.5
    assert taylor(q).shape[-1] == FEATURE_MAPS["taylor"].dim(16) == 1 + 16 + 256
    torch.testing.assert_close((taylor(q) * taylor(k)).sum(-1), 1 + s + s**2 / 2)


@torch.no_grad()  # decoding runs without autograd; deepcopy needs leaf tensors
def test_snapshot_restores_state_for_verification():
    (layer,) = pair(modes=("chunk",))
    x = torch.randn(1, 12, D_MODEL)
    cache = layer.init_cache(1, 12)
    layer(x[:, :8], cache)
    snapshot = copy.deepcopy(cache)
    layer(torch.randn(1, 3, D_MODEL), cache)  # rejected candidates
    cache = snapshot
    assert_fp32_close(layer(x[:, 8:], cache), layer(x)[:, 8:])


BAD = {
    "unknown-map": (dict(feature_map="softmax"), "feature_map='softmax'; choose one of"),
    "chunk-0": (dict(chunk_size=0), "chunk_size=0 must be >= 1"),
    "unknown-mode": (dict(mode="scan"), "mode='scan'; choose one of"),
    "identity-normalized": (dict(feature_map="identity"), "set normalize=False"),
    "eps-0": (dict(eps=0.0), "eps=0.0 must be > 0"),
    "heads": (dict(num_heads=5), "d_model=32 must be divisible by num_heads=5"),
    "rotary-size": (dict(rotary=RotaryEmbedding(4)), "rotary head_dim=4 differs"),
}


@pytest.mark.parametrize("options,message", BAD.values(), ids=BAD.keys())
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LinearAttention(D_MODEL, **{"num_heads": NUM_HEADS, **options})


def test_cache_batch_mismatch_fails_clearly():
    (layer,) = pair(modes=("chunk",))
    with pytest.raises(ValueError, match="cache has batch size 2, input has 3"):
        layer(torch.randn(3, 4, D_MODEL), layer.init_cache(2, 4))
