"""The mixer contract, checked for every conf/model/mixer/*.yaml (STYLE.md section 6)."""

import functools

import pytest
import torch
from hydra.utils import instantiate
from support import CONF, compose_config, uses_rotary

from lmkit.ops.rotary import RotaryEmbedding

MIXERS = sorted(p.stem for p in (CONF / "model" / "mixer").glob("*.yaml"))
D, H, T = 32, 4, 19  # T deliberately not a multiple of any chunk or tile size


def make_mixer(name: str, **extra) -> torch.nn.Module:
    cfg = compose_config(
        f"model/mixer={name}",
        f"model.d_model={D}",
        f"model.num_heads={H}",
        "model.dropout=0.0",
        "run_dir=/tmp/x",
    )
    factory = instantiate(cfg.model.mixer)
    # Small tiles, chunks, windows and blocks, so that T=19 crosses their boundaries.
    for option, size in (("tile_size", 8), ("chunk_size", 8), ("window", 8), ("block_size", 4)):
        if cfg.model.mixer.get(option) is not None:
            factory = functools.partial(factory, **{option: size})
    return factory(D, layer_idx=0, **extra)


@pytest.fixture(params=MIXERS)
def mixer(request):
    torch.manual_seed(0)
    return make_mixer(request.param).eval()


def test_shape_and_dtype(mixer):
    x = torch.randn(2, T, D)
    y = mixer(x)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("t", [0, 7, 8, 17])
def test_causal(mixer, t):
    x = torch.randn(2, T, D)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
    torch.testing.assert_close(mixer(x)[:, : t + 1], mixer(x2)[:, : t + 1], atol=1e-6, rtol=0)


def test_every_parameter_gets_a_gradient(mixer):
    mixer.train()
    mixer(torch.randn(2, T, D)).square().mean().backward()
    missing = [n for n, p in mixer.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_cache_equals_parallel(request, rope):
    for name in MIXERS:
        if rope and not uses_rotary(name):
            continue
        torch.manual_seed(0)
        extra = {"rotary": RotaryEmbedding(D // H)} if rope else {}
        mixer = make_mixer(name, **extra).eval()
        x = torch.randn(2, T, D)
        full = mixer(x)
        cache = mixer.init_cache(2, T)
        out, pos = [], 0
        for n in (6, 1, 3, 1, 8):  # prefill, then uneven continuations
            out.append(mixer(x[:, pos : pos + n], cache))
            pos += n
        assert cache.length == T
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5, msg=name)


def test_cache_select_and_crop(mixer):
    x = torch.randn(3, T, D)
    cache = mixer.init_cache(3, T)
    mixer(x[:, :10], cache)
    rows = torch.tensor([2, 0, 2])
    cache.select(rows)
    y = mixer(x[rows, 10:], cache)
    torch.testing.assert_close(y, mixer(x[rows])[:, 10:], atol=1e-5, rtol=1e-5)
    try:
        cache.crop(12)
    except ValueError:  # a recurrent state may refuse to go back in time, but must say so
        return
    assert cache.length == 12
    torch.testing.assert_close(
        mixer(x[rows, 12:], cache), mixer(x[rows])[:, 12:], atol=1e-5, rtol=1e-5
    )


def test_bf16_training_step_is_finite(mixer):
    mixer.train()
    x = torch.randn(2, T, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad).all()
