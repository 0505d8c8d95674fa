"""Token embedding plus an absolute positional signal (learned, sinusoidal, rope, none)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lmkit.ops.dropout import Dropout

POSITIONALS = ("learned", "sinusoidal", "rope", "none")


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # [T, 1]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2).float() / d_model)
    table = torch.zeros(max_len, d_model)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: d_model // 2])
    return table  # [T, D]


class Embedding(nn.Module):
    """Token embedding with a positional signal chosen by `positional`.

    learned: a trained [max_len, D] table (GPT-2); sinusoidal: a fixed table; rope: nothing is
    added here, the attention mixers rotate q and k (the model hands them a RotaryEmbedding);
    none: no positional signal (recurrent mixers, or NoPE attention).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        positional: str = "learned",
        max_len: int = 1024,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if positional not in POSITIONALS:
            raise ValueError(
                f"model.embedding.positional={positional!r}; choose one of {list(POSITIONALS)}"
            )
        if max_len < 1:
            raise ValueError(f"model.embedding.max_len={max_len} must be >= 1")
        self.positional, self.max_len, self.rope_base = positional, max_len, rope_base
        self.token = nn.Embedding(vocab_size, d_model)
        if positional == "learned":
            self.position = nn.Embedding(max_len, d_model)
        elif positional == "sinusoidal":
            self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)
        self.dropout = Dropout(dropout)

    @property
    def bounded(self) -> bool:
        """True when positions past max_len have no embedding (learned, sinusoidal)."""
        return self.positional in ("learned", "sinusoidal")

    def forward(self, idx: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        """idx: [B, T] token ids at absolute positions offset .. offset+T-1 (or at `positions`
        [T], e.g. the depths of a candidate tree after the cache) -> [B, T, D]."""
        T = idx.shape[1]
        x = self.token(idx)  # [B, T, D]
        last = offset + T - 1 if positions is None else int(positions.max())
        if self.bounded and last >= self.max_len:
            raise ValueError(
                f"position {last} is past the {self.positional} embedding's "
                f"max_len={self.max_len}; use a shorter context or model.embedding.max_len"
            )
        if positions is None and self.bounded:
            positions = torch.arange(offset, offset + T, device=idx.device)
        if self.positional == "learned":
            x = x + self.position(positions)
        elif self.positional == "sinusoidal":
            x = x + self.table[positions].to(x.dtype)
        return self.dropout(x)
