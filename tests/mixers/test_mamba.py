"""Mamba: the fused and chunked scans vs the sequential reference, cache vs whole sequence, init,
options, presets, and the fallback where numba is missing."""

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import compose_config

import lmkit.mixers.selective_scan as ss
from lmkit.mixers.mamba import Mamba, MambaCache
from lmkit.mixers.selective_scan import selective_scan
from lmkit.ops import cpu_scan
from lmkit.ops.cpu_causal_conv import causal_conv_silu
from lmkit.run.build import build_model
from lmkit.task import param_groups

D = 16


def scan_inputs(Bsz=2, T=19, Dm=6, N=5, dt_scale=1.0, seed=0):
    """Random x, dt, A, B, C, D, h0 (leaf tensors); dt of typical size times dt_scale, A < 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, Dm, generator=g)
    dt = F.softplus(torch.randn(Bsz, T, Dm, generator=g) - 2) * dt_scale
    A = -torch.exp(torch.randn(Dm, N, generator=g)) - 0.1
    B, C = torch.randn(Bsz, T, N, generator=g), torch.randn(Bsz, T, N, generator=g)
    skip, h0 = torch.randn(Dm, generator=g), torch.randn(Bsz, Dm, N, generator=g)
    return [t.requires_grad_() for t in (x, dt, A, B, C, skip, h0)]


def assert_rel_close(actual, expected, rel=1e-4, msg=""):
    """fp32 "rel": max |a - b| <= rel * max(1, max |b|) (ALGORITHMS.md section 0)."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"{msg}: max error {err:.3g} vs scale {scale:.3g}"


def scan_and_grads(ins, mode, chunk_size=16):
    """Outputs and the gradients of a loss on both outputs w.r.t. every input given."""
    y, h = selective_scan(*ins, mode=mode, chunk_size=chunk_size)
    w = torch.linspace(-1, 1, y.numel()).view_as(y)  # a loss that weighs every output differently
    loss = (y * w).sum() + (h * 0.5).sum()
    return y, h, torch.autograd.grad(loss, [t for t in ins if t is not None])


def test_one_step_by_hand():
    x, dt, A, B, C, skip, h0 = (t.detach() for t in scan_inputs(Bsz=1, T=1))
    y, h = selective_scan(x, dt, A, B, C, skip, h0)
    x, dt, B, C, h0 = x[0, 0], dt[0, 0], B[0, 0], C[0, 0], h0[0]
    h_ref = torch.exp(dt[:, None] * A) * h0 + dt[:, None] * B * x[:, None]  # ZOH A, Euler B
    torch.testing.assert_close(h[0], h_ref)
    torch.testing.assert_close(y[0, 0], h_ref @ C + skip * x)


@pytest.mark.parametrize(
    "T,chunk,segment",
    [(1, 16, None), (19, 1, None), (19, 5, None), (19, 8, 1), (37, 8, 3), (50, 64, None)],
    ids=lambda v: str(v),
)
def test_parallel_equals_sequential_outputs_and_gradients(monkeypatch, T, chunk, segment):
    if segment is not None:  # segments of `segment` chunks: exercises the carry across segments
        monkeypatch.setitem(ss.SEGMENT_ELEMENTS, "cpu", 2 * 6 * 5 * chunk * segment)
    ins = scan_inputs(T=T)
    y0, h0, g0 = scan_and_grads(ins, "sequential")
    y1, h1, g1 = scan_and_grads(ins, "parallel", chunk)
    assert_rel_close(y1, y0, msg="y")
    assert_rel_close(h1, h0, msg="final state")
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "h0"), g1, g0, strict=True):
        assert_rel_close(a, b, msg=f"d{name}")


# Lengths around the fused scan's checkpoints (every 32 steps) and channel counts around its
# work blocks (128 channels backward, 256 forward): the last chunk and block are partial.
@pytest.mark.parametrize(
    "T,Dm", [(1, 6), (19, 6), (31, 70), (32, 70), (33, 64), (100, 129), (65, 300)],
    ids=lambda v: str(v),
)
def test_fused_equals_sequential_outputs_and_gradients(T, Dm):
    ins = scan_inputs(T=T, Dm=Dm, N=5 if Dm < 100 else 16)
    y0, h0, g0 = scan_and_grads(ins, "sequential")
    y1, h1, g1 = scan_and_grads(ins, "fused")
    assert_rel_close(y1, y0, msg="y")
    assert_rel_close(h1, h0, msg="final state")
    for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "h0"), g1, g0, strict=True):
        assert_rel_close(a, b, msg=f"d{name}")


def test_fused_exp_is_float32_exact_over_the_decays_range():
    """The polynomial exp against float64 exp, down to where float32 flushes to zero: within
    4e-7 plus what rounding v to float32 costs (|v| 2^-24; z = v log2(e) is rounded once more)."""
    v = -torch.cat([torch.linspace(0, 1, 10_001), torch.logspace(0, 2, 10_001)])[::97]
    expected = torch.exp(v.double())
    got = torch.tensor([float(cpu_scan.fast_exp(np.float32(t))) for t in v]).double()
    normal = expected > 2**-126
    excess = (got - expected).abs() / expected - (4e-7 + v.abs().double() * 2**-24)
    assert excess[normal].max() < 0, excess[normal].max()
    assert (got[~normal] < 2**-125).all()


@pytest.mark.parametrize("T,D,K", [(1, 3, 4), (3, 5, 4), (40, 70, 4), (17, 8, 2)])
def test_fused_causal_conv_silu_equals_conv1d_then_silu(T, D, K):
    """The fused kernel against nn.functional.conv1d on a left-padded [B, D, T] copy: outputs and
    the gradients of input, weight and bias, including T shorter than the kernel."""
    g = torch.Generator().manual_seed(T)
    u = torch.randn(3, T, D, generator=g, requires_grad=True)
    weight = torch.randn(D, K, generator=g, requires_grad=True)
    bias = torch.randn(D, generator=g, requires_grad=True)
    w_out = torch.randn(3, T, D, generator=g)
    fused = causal_conv_silu(u, weight, bias)
    grads = torch.autograd.grad((fused * w_out).sum(), [u, weight, bias])
    padded = F.pad(u.transpose(1, 2), (K - 1, 0))
    reference = F.silu(F.conv1d(padded, weight[:, None], bias, groups=D)).transpose(1, 2)
    expected = torch.autograd.grad((reference * w_out).sum(), [u, weight, bias])
    assert_rel_close(fused.detach(), reference.detach(), rel=1e-5, msg="y")
    for name, a, b in zip(("u", "weight", "bias"), grads, expected, strict=True):
        assert_rel_close(a, b, rel=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("mode", ["parallel", "fused"])
def test_without_skip_and_initial_state(mode):
    ins = scan_inputs(T=21)[:5] + [None, None]
    y0, _, g0 = scan_and_grads(ins, "sequential")
    y1, _, g1 = scan_and_grads(ins, mode, 4)
    assert_rel_close(y1, y0, msg="y")
    for a, b in zip(g1, g0, strict=True):
        assert_rel_close(a, b, msg="grad")


@pytest.mark.parametrize("mode", ["parallel", "fused"])
def test_long_sequence_is_stable_and_exact(mode):
    """T=8192 with dt up to about 5 and |A| up to 16: the decays underflow, nothing overflows."""
    ins = scan_inputs(Bsz=1, T=8192, Dm=4, N=4, dt_scale=20.0)
    with torch.no_grad():
        ins[2].copy_(-torch.arange(1.0, 17.0).view(4, 4))
        y0, h0 = selective_scan(*ins, mode="sequential")
    y1, h1 = selective_scan(*ins, mode=mode, chunk_size=64)
    y1.square().mean().backward()
    assert torch.isfinite(y1).all() and all(torch.isfinite(t.grad).all() for t in ins)
    assert_rel_close(y1.detach(), y0, msg="y")
    assert_rel_close(h1.detach(), h0, msg="final state")


def test_scan_under_autocast_keeps_float32():
    x, dt, A, B, C = (t.detach() for t in scan_inputs()[:5])
    expected, _ = selective_scan(x, dt, A, B, C)
    for mode in ("fused", "parallel", "sequential"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, h = selective_scan(x, dt, A, B, C, mode=mode)
        assert y.dtype == h.dtype == torch.float32
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def make_mamba(scan="fused", seed=0, **kwargs):
    torch.manual_seed(seed)
    return Mamba(D, d_state=4, scan=scan, chunk_size=8, **kwargs).eval()


def test_mamba_under_bf16_is_as_close_to_fp32_as_the_reference():
    """bf16 error of the fast path within a small factor of the reference's (ALGORITHMS.md 0)."""
    x = torch.randn(2, 40, D)
    errors = {}
    for scan in ("fused", "parallel", "sequential"):
        m = make_mamba(scan)
        exact = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            errors[scan] = (m(x).float() - exact).abs().max().item()
    assert errors["parallel"] <= 3 * errors["sequential"] + 1e-6, errors
    assert errors["fused"] <= 3 * errors["sequential"] + 1e-6, errors


@pytest.mark.parametrize("scan", ["parallel", "fused"])
def test_mamba_scans_equal_sequential_with_parameter_gradients(scan):
    par, seq = make_mamba(scan), make_mamba("sequential")
    x = torch.randn(2, 29, D)
    outs = []
    for m in (par, seq):
        y = m(x)
        y.square().mean().backward()
        outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert_rel_close(outs[0][0], outs[1][0], msg="y")
    for name, grad in outs[0][1].items():
        assert_rel_close(grad, outs[1][1][name], msg=name)


@pytest.mark.parametrize("t", [6, 7, 8, 15, 16])  # around chunk boundaries (chunk_size=8)
def test_causal_at_chunk_boundaries(t):
    m = make_mamba()
    x = torch.randn(2, 25, D)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
    torch.testing.assert_close(m(x)[:, : t + 1], m(x2)[:, : t + 1], atol=0, rtol=0)


@pytest.mark.parametrize("scan", ["fused", "parallel", "sequential"])
@pytest.mark.parametrize("prefill", [1, 2, 5, 11])  # 1 and 2 are shorter than d_conv - 1
def test_cache_steps_equal_parallel(scan, prefill):
    m = make_mamba(scan)
    x = torch.randn(3, 20, D)
    full = m(x)
    cache = m.init_cache(3, 20)
    out = [m(x[:, :prefill], cache)]
    _, h_prefix = _ssm_state_after(m, x[:, :prefill])
    torch.testing.assert_close(cache.ssm_state, h_prefix, atol=1e-6, rtol=1e-5)
    for t in range(prefill, 20):
        out.append(m(x[:, t : t + 1], cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def _ssm_state_after(m, x):
    """Final SSM state of a cache-less run, recomputed through the reference scan."""
    captured = {}
    original = m._scan

    def spy(*args):
        captured["out"] = original(*args)
        return captured["out"]

    m._scan = spy
    m(x)
    del m._scan
    return captured["out"]


def test_fused_falls_back_to_the_chunked_scan_without_numba(monkeypatch, caplog):
    """Where numba cannot be imported, scan=fused runs the chunked scan and nn.Conv1d, and says
    so once."""
    monkeypatch.setattr(cpu_scan, "numba", None)
    ss.fused_available.cache_clear()
    try:
        ins = scan_inputs(T=23)
        with caplog.at_level(logging.WARNING, logger=ss.__name__):
            y_fallback, h_fallback, g_fallback = scan_and_grads(ins, "fused", 8)
            scan_and_grads(ins, "fused", 8)
            x = torch.randn(2, 21, D)
            layer_fallback, layer_chunked = make_mamba("fused")(x), make_mamba("parallel")(x)
    finally:
        ss.fused_available.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.name == ss.__name__]
    assert warnings == [
        "numba is not installed: the CPU selective scan falls back to scan=parallel"
    ]
    y, h, g = scan_and_grads(ins, "parallel", 8)
    torch.testing.assert_close(y_fallback, y, atol=0, rtol=0)
    torch.testing.assert_close(layer_fallback, layer_chunked, atol=0, rtol=0)  # conv1d too
    for a, b in zip(g_fallback, g, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_cache_is_constant_size_and_refuses_crop():
    m = make_mamba()
    cache = m.init_cache(2, 1000)
    assert cache.conv_state.shape == (2, 2 * D, 3) and cache.ssm_state.shape == (2, 2 * D, 4)
    assert cache.ssm_state.dtype == torch.float32
    assert m.state_size(10) == m.state_size(10_000) == 2 * D * (3 + 4)
    m(torch.randn(2, 5, D), cache)
    cache.crop(5)  # the current length is fine
    with pytest.raises(ValueError, match="cannot be cropped to 3"):
        cache.crop(3)
    assert isinstance(cache, MambaCache) and cache.length == 5


def test_s4d_real_and_dt_init():
    m = Mamba(64, d_state=16, dt_min=1e-3, dt_max=1e-1)
    n1 = torch.arange(1.0, 17.0).expand(128, 16)
    assert torch.equal(m.A_log, torch.log(n1))  # S4D-real: A_n = -(n + 1), stored as log(n + 1)
    A = -torch.exp(m.A_log)
    torch.testing.assert_close(A, -n1, rtol=1e-6, atol=0)  # exp(log(n)) is n to within an ulp
    assert m.A_log.dtype == m.D.dtype == torch.float32 and torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    bound = m.dt_rank**-0.5
    assert m.dt_rank == 4 and m.dt_proj.weight.abs().max() <= bound
    decay = torch.exp(dt[:, None] * A)
    assert ((decay > 0) & (decay < 1)).all()


def test_inverse_softplus_round_trip():
    dt = torch.tensor([1e-4, 1e-3, 0.05, 0.1, 1.0])
    torch.testing.assert_close(F.softplus(dt + torch.log(-torch.expm1(-dt))), dt)


def test_parameter_count_matches_mamba_130m_block():
    # ALGORITHMS.md section 5: D = 768 gives 3,770,880 parameters per block.
    assert sum(p.numel() for p in Mamba(768).parameters()) == 3_770_880


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"d_state": 0}, "d_state=0"),
        ({"expand": 1.5}, "expand=1.5"),
        ({"dt_rank": "low"}, "dt_rank='low'"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min=0.2"),
        ({"scan": "blelloch"}, "scan='blelloch'"),
        ({"chunk_size": 0}, "chunk_size=0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(D, **kwargs)


def test_misspelt_option_fails():
    with pytest.raises(TypeError):
        Mamba(D, d_sate=16)


def test_preset_builds_a_model_without_mlp_or_positions_and_keeps_mamba_init():
    cfg = compose_config("model/mixer=mamba", "run_dir=/tmp/x")
    assert cfg.model.mlp is None and cfg.model.layer_multiplier == 2
    assert cfg.model.embedding.positional == "none"
    model = build_model(cfg, vocab_size=11)
    assert len(model.blocks) == 2 * cfg.model.num_layers
    mixer = model.blocks[0].mixer
    assert isinstance(mixer, Mamba) and model.blocks[0].mlp is None
    dt = F.softplus(mixer.dt_proj.bias)  # the model's zero-bias init must have left it alone
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    std = 0.02 / math.sqrt(2 * len(model.blocks))
    assert mixer.out_proj.weight.std().item() == pytest.approx(std, rel=0.2)
    no_decay = {id(p) for p in param_groups(model, 0.1)[1]["params"]}
    assert id(mixer.A_log) in no_decay and id(mixer.D) in no_decay
    assert id(mixer.in_proj.weight) not in no_decay


def test_preset_options_can_be_overridden():
    cfg = compose_config(
        "model/mixer=mamba", "model.mixer.d_state=8", "model.mixer.scan=sequential"
    )
    model = build_model(cfg, vocab_size=11)
    mixer = model.blocks[0].mixer
    assert mixer.d_state == 8 and mixer.scan == "sequential"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_parallel_equals_sequential_on_cuda():
    ins = [t.detach().cuda().requires_grad_() for t in scan_inputs(T=300)]
    y0, h0, g0 = scan_and_grads(ins, "sequential")
    y1, h1, g1 = scan_and_grads(ins, "parallel", 16)
    assert_rel_close(y1, y0, msg="y")
    for a, b in zip(g1, g0, strict=True):
        assert_rel_close(a, b, msg="grad")
