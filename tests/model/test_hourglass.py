"""Hourglass models: causality for every resampling pair, the 1-D PixelShuffle, cached
generation equal to recomputation, FLOPs of the shortened layers, and configs."""

import functools
import itertools

import pytest
import torch

from lmkit.decoding.sampling import generate
from lmkit.mixers.linear import LinearAttention
from lmkit.mixers.mamba import Mamba
from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.embeddings import Embedding
from lmkit.model.hourglass import HourglassLM
from lmkit.model.mlp import MLP
from lmkit.model.resampling import DOWNSAMPLING, UPSAMPLING, ResampleState, Upsample

V, D, H = 23, 16, 2
MIXERS = {
    "softmax": functools.partial(SoftmaxAttention, num_heads=H, backend="naive"),
    "linear": functools.partial(LinearAttention, num_heads=H, chunk_size=4),
    "mamba": functools.partial(Mamba, d_state=4, chunk_size=4),
}


def hourglass(
    down="linear", up="linear", shorten=(3,), mixer="softmax", num_layers=4, positional="rope"
):
    torch.manual_seed(0)
    model = HourglassLM(
        V,
        shorten=list(shorten),
        downsample=down,
        upsample=up,
        mixer=MIXERS[mixer],
        mlp=None if mixer == "mamba" else functools.partial(MLP),
        embedding=functools.partial(Embedding, positional=positional, max_len=64),
        d_model=D,
        num_layers=num_layers,
        num_heads=H,
    )
    with torch.no_grad():  # resamplers start at GPT-2's small init: make them matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(("down", "up"), list(itertools.product(DOWNSAMPLING, UPSAMPLING)))
@pytest.mark.parametrize("shorten", [(3,), (2, 2)])
def test_no_output_sees_a_later_token(down, up, shorten):
    model = hourglass(down, up, shorten, num_layers=2 * len(shorten) + 1)
    T = 11  # not a multiple of any factor
    idx = torch.randint(0, V, (2, T))
    base = model(idx)
    for p in (1, 3, 4, 6, 9, 10):  # group starts, inside groups, the last token
        changed = idx.clone()
        changed[:, p] = (changed[:, p] + 1) % V
        out = model(changed)
        torch.testing.assert_close(out[:, :p], base[:, :p], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, p:], base[:, p:])  # and the token does matter


def test_without_the_shift_the_short_vectors_would_leak():
    """The check above can fail: pooling the unshifted groups lets position g k see g k + 1."""
    model = hourglass("mean", "repeat")
    shortens = model.shortens[0]
    unshifted = shortens.forward

    def leaky(x, state):  # pool [g k, g k + k) instead of [g k - k + 1, g k]
        T = x.shape[1]
        pad = -T % 3
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(x.shape[0], -1, 3, x.shape[2]).mean(2)

    shortens.forward = leaky
    idx = torch.randint(0, V, (1, 9))
    changed = idx.clone()
    changed[:, 4] = (changed[:, 4] + 1) % V
    assert not torch.allclose(model(idx)[:, :4], model(changed)[:, :4])
    shortens.forward = unshifted


def test_linear_upsampling_is_the_1d_pixel_shuffle():
    k, G = 3, 4
    up = Upsample(D, k, "linear")
    short = torch.randn(2, G, D)
    residual = torch.zeros(2, G * k, D)
    out = up(residual, short, ResampleState())
    W, b = up.proj.weight, up.proj.bias  # [k D, D], [k D]
    for g in range(G):
        for r in range(k):  # position g k + r gets slice r of the projection of short vector g
            expected = short[:, g] @ W[r * D : (r + 1) * D].T + b[r * D : (r + 1) * D]
            torch.testing.assert_close(out[:, g * k + r], expected)


@pytest.mark.parametrize("up", UPSAMPLING)
@pytest.mark.parametrize("mixer", list(MIXERS))
def test_cached_generation_equals_recomputation(up, mixer):
    model = hourglass("linear", up, (3,), mixer)
    idx = torch.randint(0, V, (2, 14))
    full = model(idx)
    caches = model.init_caches(2, 14)
    pieces = [model(idx[:, :5], caches)]  # a prompt that ends inside a group
    pieces += [model(idx[:, t : t + 1], caches) for t in range(5, 9)]  # one token at a time
    pieces.append(model(idx[:, 9:], caches))  # then a chunk again
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    assert caches.length == 14 and caches.levels[0].position == 14


def test_two_level_cached_generation_and_sampling():
    model = hourglass("mean", "attention", (2, 2), num_layers=5)
    idx = torch.randint(0, V, (1, 13))
    caches = model.init_caches(1, 13)
    stepwise = torch.cat([model(idx[:, t : t + 1], caches) for t in range(13)], 1)
    torch.testing.assert_close(stepwise, model(idx), rtol=1e-4, atol=1e-5)
    out = generate(model, idx[:, :4], 9, temperature=0.0)  # greedy through the caches
    expected = idx[:, :4]
    for _ in range(9):  # greedy by recomputing the whole sequence at every step
        expected = torch.cat([expected, model(expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, expected)


def plain(num_layers=4):
    torch.manual_seed(0)
    return DecoderLM(
        V,
        mixer=MIXERS["softmax"],
        mlp=functools.partial(MLP),
        embedding=functools.partial(Embedding, positional="rope"),
        d_model=D,
        num_layers=num_layers,
        num_heads=H,
    )


def test_flops_count_the_shortened_layers_at_their_rate():
    T = 50  # not a multiple of 3: the short sequence has ceil(50 / 3) = 17 vectors
    dense, short = plain(4).flops_per_token(T), hourglass("mean", "repeat").flops_per_token(T)
    block = dense["mixer"] / 4 + dense["mlp"] / 4  # one full-length block
    middle = SoftmaxAttention(D, num_heads=H).flops_per_token(17) + dense["mlp"] / 4
    assert short["forward"] == pytest.approx(2 * block + 2 * middle / 3 + dense["head"])
    assert short["forward"] < dense["forward"]
    linear = hourglass("linear", "linear").flops_per_token(T)
    assert linear["resample"] == pytest.approx(2 * 3 * D * D / 3 + 2 * D * 3 * D / 3)
    attention = hourglass("mean", "attention").flops_per_token(T)
    keys = sum(p // 3 + 1 for p in range(T)) / T  # short vectors position p sees
    # q and o per position, k and v per short vector, scores and values over the keys
    assert attention["resample"] == pytest.approx(4 * D * D + 4 * D * D / 3 + 4 * D * keys)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="leaves 0 middle layers"):
        hourglass(num_layers=2)
    with pytest.raises(ValueError, match="downsample='max'"):
        hourglass(down="max")
    with pytest.raises(ValueError, match="upsample='bilinear'"):
        hourglass(up="bilinear")
    with pytest.raises(ValueError, match="factors >= 1"):
        hourglass(shorten=(0,))


def test_the_config_builds_an_hourglass_of_any_mixer():
    from support import compose_config

    from lmkit.run.build import build_model

    for mixer in ("linear", "mamba"):
        cfg = compose_config("model=hourglass", f"model/mixer={mixer}", "model.num_layers=4")
        model = build_model(cfg, V)
        assert isinstance(model, HourglassLM) and model.shorten_factors == [3]
        assert model(torch.randint(0, V, (1, 10))).shape == (1, 10, V)
