"""Output heads: hidden states -> next-token logits (LMHead) and Medusa's look-ahead heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LMHead(nn.Module):
    """Linear map to the vocabulary; its weight may be tied to the token embedding."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)  # [B, T, V]


class MedusaHead(nn.Module):
    """One Medusa head (Cai et al., 2024): a residual block h + SiLU(W1 h + b1), then its own
    vocabulary projection. W1 and b1 start at zero, so the block starts as the identity."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.block = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.zeros_(self.block.weight)
        nn.init.zeros_(self.block.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h + F.silu(self.block(h)))


class MedusaHeads(nn.Module):
    """K heads; head k (1-based) reads the hidden state at position t and predicts token
    t + k + 1 (the LM head predicts t + 1). Each head is its own module (no shared weights)."""

    def __init__(self, d_model: int, vocab_size: int, num_heads: int = 4) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"model.medusa_heads={num_heads} must be >= 1 (0 disables them)")
        self.heads = nn.ModuleList(MedusaHead(d_model, vocab_size) for _ in range(num_heads))

    def __len__(self) -> int:
        return len(self.heads)

    @torch.no_grad()
    def init_from(self, lm_head: LMHead) -> None:
        """Start every head's projection as a copy of the LM head (the paper's initialisation),
        and every residual block at zero: each head starts out predicting what the LM head does."""
        for head in self.heads:
            head.proj.weight.copy_(lm_head.proj.weight)
            head.block.weight.zero_()
            head.block.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        """h: [B, T, D] -> logits [K, B, T, V]."""
        return torch.stack([head(h) for head in self.heads])


def medusa_targets(targets: Tensor, k: int) -> Tensor:
    """Targets of head k (1-based) at every position: the next-token targets shifted by k, the
    last k positions IGNORE_INDEX (their token lies beyond the window). targets: [B, T]."""
    shifted = torch.full_like(targets, -100)
    shifted[:, : targets.shape[1] - k] = targets[:, k:]
    return shifted
