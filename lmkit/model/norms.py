"""Normalisation layers selectable by name (`model.norm`)."""

from __future__ import annotations

from torch import nn

NORMS = ("layernorm", "rmsnorm")


def build_norm(kind: str, d_model: int, *, eps: float = 1e-5) -> nn.Module:
    """LayerNorm (with bias, as GPT-2) or RMSNorm (Zhang & Sennrich, 2019; no mean, no bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"model.norm={kind!r} is not a norm; choose one of {list(NORMS)}")
