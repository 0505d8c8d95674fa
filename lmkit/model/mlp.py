"""Position-wise feed-forward network of a block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.ops.dropout import Dropout

ACTIVATIONS = ("gelu", "swiglu")


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer, 2020).

    hidden_mult: hidden width as a multiple of d_model. SwiGLU uses 2/3 of it (rounded up to a
    multiple of 8) so its three matrices hold about as many parameters as GELU's two.
    """

    def __init__(
        self,
        d_model: int,
        *,
        activation: str = "gelu",
        hidden_mult: float = 4.0,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.mlp.activation={activation!r}; choose one of {list(ACTIVATIONS)}"
            )
        if hidden_mult <= 0:
            raise ValueError(f"model.mlp.hidden_mult={hidden_mult} must be positive")
        hidden = int(hidden_mult * d_model)
        self.activation = activation
        if activation == "swiglu":
            hidden = -(-int(2 * hidden / 3) // 8) * 8
            self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)  # residual projection
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x))
        return self.dropout(self.down_proj(h))
