"""Feature maps phi for linear attention: softmax(q.k) is replaced by the kernel phi(q).phi(k)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class FeatureMap:
    """phi applied per head to queries and keys: [..., Dh] -> [..., dim(Dh)].

    nonnegative: phi(q).phi(k) >= 0 for all q, k, so the normaliser sum_j phi(q).phi(k_j) is safe.
    dot_kernel: phi(q).phi(k) is a function of q.k alone, so rotating q and k before phi keeps
    the score a function of relative position (rotary); other maps are rotated after phi.
    """

    fn: Callable[[Tensor], Tensor]
    dim: Callable[[int], int]
    nonnegative: bool
    dot_kernel: bool = False


def elu_plus_one(x: Tensor) -> Tensor:
    """elu(x) + 1 > 0 (Katharopoulos et al., 2020). Call in float32: in bf16 it rounds to 0
    below about -8 (flash-linear-attention PR #1265)."""
    return F.elu(x) + 1.0


def taylor(x: Tensor) -> Tensor:
    """Second-order Taylor features of exp (Based, Arora et al., 2024): [1, x', vec(x' x'^T)/sqrt 2]
    with x' = x / d^(1/4), so phi(q).phi(k) = 1 + s + s^2 / 2 > 0 with s = q.k / sqrt(d)."""
    x = x * x.shape[-1] ** -0.25
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2.0)  # [..., d * d]
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)  # [..., 1 + d + d * d]


def _same(d: int) -> int:
    return d


FEATURE_MAPS: dict[str, FeatureMap] = {
    "elu": FeatureMap(elu_plus_one, _same, nonnegative=True),
    "relu": FeatureMap(F.relu, _same, nonnegative=True),
    # May give negative or zero denominators: use it with normalize=False (a norm on the output).
    "identity": FeatureMap(lambda x: x, _same, nonnegative=False, dot_kernel=True),
    "taylor": FeatureMap(taylor, lambda d: 1 + d + d * d, nonnegative=True, dot_kernel=True),
}
