"""Model FLOPs: the matmuls a forward pass does per token, counted by hand from the shapes.

Conventions (those of MFU, Chowdhery et al. 2022, appendix B):
- a matmul of [m, k] by [k, n] is 2 m k n FLOPs; one training step is 3x the forward (the
  backward pass does two matmuls per forward matmul). Recomputation is not counted.
- every nn.Linear costs 2 * in * out per token it sees; embeddings are lookups (0).
- causal mixing counts the useful work: query t of a causal window of T sees t + 1 keys, so a
  mean of (T + 1) / 2 keys per token; sparse patterns count the keys their mask allows.
- elementwise work (norms, activations, softmax, rotary) is not counted, except Mamba's scan
  and depthwise conv, which are its token mixing (see Mamba.mixing_flops).

Each mixer counts its own mixing (`Mixer.mixing_flops`); `DecoderLM.flops_per_token` adds the
projections, MLPs and heads. Tests check the totals against a hand count and, where the forms
compute exactly these matmuls, against torch.utils.flop_counter. That counter is no substitute:
it counts the masked half of causal attention as work, and on CPU (torch 2.13) it does not see
the fused SDPA kernel at all.
"""

from __future__ import annotations

from torch import nn


def linear_flops(module: nn.Module | None) -> int:
    """Forward FLOPs per token of every nn.Linear inside module (each sees every token)."""
    if module is None:
        return 0
    return sum(
        2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)
    )


def mean_causal_keys(seq_len: int) -> float:
    """Mean number of keys a query sees in a causal window of seq_len tokens: (T + 1) / 2."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    return (seq_len + 1) / 2


def train_flops(forward_flops: float) -> float:
    """Training FLOPs from forward FLOPs: forward + backward (2x: input and weight gradients)."""
    return 3 * forward_flops
