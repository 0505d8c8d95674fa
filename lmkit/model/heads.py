"""The output head: hidden states -> next-token logits."""

from __future__ import annotations

from torch import Tensor, nn


class LMHead(nn.Module):
    """Linear map to the vocabulary; its weight may be tied to the token embedding."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)  # [B, T, V]
