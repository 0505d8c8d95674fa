"""Rotary embedding: a complex rotation of channel pairs (i, i + Dh/2), and scores that depend
only on the distance between positions."""

import torch

from lmkit.ops.rotary import RotaryEmbedding


def test_rotation_of_each_channel_pair():
    torch.manual_seed(0)
    B, H, T, Dh = 2, 3, 7, 8
    x = torch.randn(B, H, T, Dh)
    rope = RotaryEmbedding(Dh)
    offset = 5
    theta = torch.outer(torch.arange(offset, offset + T).double(), rope.inv_freq.double())
    z = torch.complex(x[..., : Dh // 2].double(), x[..., Dh // 2 :].double()) * torch.polar(
        torch.ones_like(theta), theta
    )
    expected = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(rope(x, offset), expected, atol=1e-5, rtol=1e-5)
    # explicit positions give the same rotation, and bf16 comes back as bf16
    positions = torch.arange(offset, offset + T)
    torch.testing.assert_close(rope(x, positions=positions), expected, atol=1e-5, rtol=1e-5)
    # in bf16: within two bf16 roundings of the exact rotation of the bf16 input
    low = rope(x.bfloat16(), offset)
    assert low.dtype == torch.bfloat16
    exact = rope(x.bfloat16().double(), offset)
    assert ((low.double() - exact).abs() <= 2**-7 * exact.abs().clamp_min(1) + 1e-3).all()


def test_scores_depend_on_distance_only():
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rope = RotaryEmbedding(16)

    def score(m, n):
        return (rope(q, m) * rope(k, n)).sum().item()

    assert abs(score(3, 1) - score(40, 38)) < 1e-4
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
