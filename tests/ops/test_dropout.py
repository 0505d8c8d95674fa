"""The CPU dropout cut from random int32 words: Bernoulli masks with the right rate, independent
elements, an unchanged expectation, and torch's seeding."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmkit.ops.dropout import LANES, Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_lane_drops_at_rate_p_independently(p):
    torch.manual_seed(0)
    n = 2_000_000
    keep, scale = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    q = round(p * LANES) / LANES  # the rate actually used
    assert scale == pytest.approx(1 / (1 - q))
    sigma = math.sqrt(q * (1 - q) / (n // 2))
    low, high = keep[: n // 2].float(), keep[n // 2 :].float()  # the two lanes of each word
    for lane in (low, high):
        assert abs(1 - lane.mean().item() - q) < 5 * sigma
    # both lanes of one word are kept together as often as independent draws would be
    both = (low * high).mean().item()
    assert abs(both - (1 - q) ** 2) < 5 * math.sqrt((1 - q) ** 2 / (n // 2))
    # neighbours within a lane are independent too
    pairs = (low[:-1] * low[1:]).mean().item()
    assert abs(pairs - (1 - q) ** 2) < 5 * math.sqrt((1 - q) ** 2 / (n // 2))


def test_expectation_and_gradient():
    torch.manual_seed(1)
    x = torch.full((1000, 999), 3.0, requires_grad=True)  # odd element count
    y = dropout(x, 0.25)
    assert y.shape == x.shape
    assert y.mean().item() == pytest.approx(3.0, rel=0.01)
    kept = y != 0
    assert torch.allclose(y[kept], torch.tensor(3.0 * LANES / (LANES - round(0.25 * LANES))))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach() / 3.0)  # d out / d x = mask * scale


def test_identity_when_off_and_dtype_kept():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.3).dtype == torch.bfloat16
    module = Dropout(0.3).eval()
    assert module(x) is x


def test_seeded_like_torch_dropout():
    x = torch.randn(64, 64)
    torch.manual_seed(7)
    a = dropout(x, 0.5)
    torch.manual_seed(7)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_matches_torch_dropout_in_distribution():
    """Same rate and scale as F.dropout: the kept fractions agree within sampling error."""
    torch.manual_seed(2)
    x = torch.ones(500_000)
    ours = (dropout(x, 0.1) != 0).float().mean().item()
    theirs = (F.dropout(x, 0.1) != 0).float().mean().item()
    assert abs(ours - theirs) < 5 * math.sqrt(0.09 / 500_000) * 2


def test_bad_probability():
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(torch.ones(3), -0.1)


def test_probability_just_below_one_keeps_a_lane():
    keep, scale = keep_mask(torch.Size([10]), 1 - 2**-17, torch.device("cpu"))
    assert scale == LANES  # drops all but 1 / 2^15, finite scale
