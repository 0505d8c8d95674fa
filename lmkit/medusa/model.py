"""Medusa heads on a DecoderLM: head k (1-based) reads the final hidden state at position t and
predicts token t + k + 1 (the LM head predicts t + 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.evaluation import IGNORE_INDEX
from lmkit.model.heads import LMHead
from lmkit.ops.flops import linear_flops, train_flops


class MedusaHead(nn.Module):
    """One head: a residual block h + SiLU(W1 h + b1), then its own vocabulary projection. W1
    and b1 start at zero, so the block starts as the identity."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.block = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.zeros_(self.block.weight)
        nn.init.zeros_(self.block.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h + F.silu(self.block(h)))


class MedusaHeads(nn.ModuleList):
    """K heads, each its own module (no shared weights)."""

    def __init__(self, d_model: int, vocab_size: int, num_heads: int = 4) -> None:
        if num_heads < 1:
            raise ValueError(f"task.heads={num_heads} must be >= 1")
        super().__init__(MedusaHead(d_model, vocab_size) for _ in range(num_heads))

    @torch.no_grad()
    def init_from(self, lm_head: LMHead) -> None:
        """Every head's projection a copy of the LM head (the paper's initialisation), every
        residual block zero: each head starts out predicting what the LM head does."""
        for head in self:
            head.proj.weight.copy_(lm_head.proj.weight)
            head.block.weight.zero_()
            head.block.bias.zero_()

    def forward(self, h: Tensor) -> Tensor:
        """h: [B, T, D] -> logits [K, B, T, V] (the reference form)."""
        return torch.stack([head(h) for head in self])

    def propose(self, h: Tensor) -> Tensor:
        """All K heads on one hidden state h [D] -> logits [K, V], as two batched products:
        the numbers of forward() with a fraction of its per-op overhead at batch 1."""
        w1 = torch.stack([head.block.weight for head in self])  # [K, D, D]
        b1 = torch.stack([head.block.bias for head in self])  # [K, D]
        w2 = torch.stack([head.proj.weight for head in self])  # [K, V, D]
        x = h.to(w1.dtype).expand(len(self), -1)  # [K, D]
        y = x + F.silu(torch.baddbmm(b1.unsqueeze(-1), w1, x.unsqueeze(-1)).squeeze(-1))
        return torch.bmm(w2, y.unsqueeze(-1)).squeeze(-1)


class MedusaLM(nn.Module):
    """A DecoderLM (`base`) with Medusa heads (`heads`) on its final hidden states. As a
    language model it is the base: forward, caches and decoding are the base's own."""

    def __init__(self, base: nn.Module, num_heads: int = 4) -> None:
        super().__init__()
        self.base = base
        self.heads = MedusaHeads(base.d_model, base.vocab_size, num_heads)
        self.heads.init_from(base.head)

    def forward(self, idx: Tensor, caches: list | None = None) -> Tensor:
        return self.base(idx, caches)

    def hidden_states(self, idx: Tensor, caches: list | None = None, tree=None) -> Tensor:
        return self.base.hidden_states(idx, caches, tree)

    @property
    def head(self) -> LMHead:
        return self.base.head

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    @property
    def max_len(self) -> int | None:
        return self.base.max_len

    @property
    def supports_tree(self) -> bool:
        return self.base.supports_tree

    def init_caches(self, batch_size: int, max_len: int, device=None, dtype=None) -> list:
        return self.base.init_caches(batch_size, max_len, device=device, dtype=dtype)

    def num_params(self, *, non_embedding: bool = False) -> int:
        return self.base.num_params(non_embedding=non_embedding) + sum(
            p.numel() for p in self.heads.parameters()
        )

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """The base's FLOPs per token plus the heads' ("heads")."""
        flops = dict(self.base.flops_per_token(seq_len))
        flops["heads"] = linear_flops(self.heads)
        flops["forward"] += flops["heads"]
        flops["train"] = train_flops(flops["forward"])
        return flops


def head_targets(targets: Tensor, k: int) -> Tensor:
    """Targets of head k (1-based) at every position: the next-token targets shifted by k, the
    last k positions IGNORE_INDEX (their token lies beyond the window). targets: [B, T]."""
    shifted = torch.full_like(targets, IGNORE_INDEX)
    shifted[:, : targets.shape[1] - k] = targets[:, k:]
    return shifted
