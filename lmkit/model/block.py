"""One pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

from __future__ import annotations

from torch import Tensor, nn

from lmkit.mixers.base import Cache, Mixer, TreeStep
from lmkit.model.norms import build_norm
from lmkit.ops.dropout import Dropout


class Block(nn.Module):
    """Pre-norm block. The MLP is optional: mixers with their own (GAU, Mamba) set mlp=None."""

    def __init__(
        self,
        d_model: int,
        mixer: Mixer,
        mlp: nn.Module | None,
        *,
        norm: str = "layernorm",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.mixer_norm = build_norm(norm, d_model)
        self.mixer = mixer
        self.mlp_norm = build_norm(norm, d_model) if mlp is not None else None
        self.mlp = mlp
        self.dropout = Dropout(dropout)

    def forward(
        self, x: Tensor, cache: Cache | None = None, tree: TreeStep | None = None
    ) -> Tensor:
        h = self.mixer_norm(x)
        mixed = self.mixer(h, cache) if tree is None else self.mixer(h, cache, tree=tree)
        x = x + self.dropout(mixed)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x
