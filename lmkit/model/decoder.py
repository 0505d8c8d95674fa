"""DecoderLM: embedding -> N x Block(norm, mixer, norm, mlp) -> norm -> LM head."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lmkit.mixers.base import Cache, Mixer, TreeStep
from lmkit.model.block import Block
from lmkit.model.embeddings import Embedding
from lmkit.model.heads import LMHead
from lmkit.model.norms import build_norm
from lmkit.ops.flops import linear_flops, train_flops
from lmkit.ops.rotary import RotaryEmbedding

log = logging.getLogger(__name__)

# Residual projections (the last matrix before a residual add) get GPT-2's 1/sqrt(2L) init scale.
RESIDUAL_PROJECTIONS = ("out_proj", "down_proj")


class DecoderLM(nn.Module):
    """Decoder-only language model whose sequence mixer, MLP and embedding come from the config.

    `mixer`, `mlp` and `embedding` are partials (Hydra `_partial_: true`) completed here, one mixer
    per block. A mixer that brings its own channel mixing (GAU, Mamba) runs with `mlp=None` and
    `layer_multiplier=2`: two of its blocks per layer hold about a Transformer layer's parameters.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        mixer: Callable[..., Mixer],
        mlp: Callable[..., nn.Module] | None = None,
        embedding: Callable[..., Embedding] = Embedding,
        d_model: int = 128,
        num_layers: int = 4,
        num_heads: int = 4,
        layer_multiplier: int = 1,
        norm: str = "layernorm",
        tie_weights: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes(
            vocab_size=vocab_size,
            d_model=d_model,
            num_layers=num_layers,
            num_heads=num_heads,
            layer_multiplier=layer_multiplier,
        )
        num_blocks = num_layers * layer_multiplier
        # num_layers counts blocks from here on: caches, init scaling and reports go by blocks.
        self.vocab_size, self.d_model, self.num_layers = vocab_size, d_model, num_blocks
        self.num_heads, self.tie_weights = num_heads, tie_weights
        self.embedding = embedding(vocab_size, d_model)
        mixer_extra = self._rotary_options(mixer)
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                mixer(d_model, layer_idx=i, **mixer_extra),
                mlp(d_model) if mlp is not None else None,
                norm=norm,
                dropout=dropout,
            )
            for i in range(num_blocks)
        )
        self.final_norm = build_norm(norm, d_model)
        self.head = LMHead(d_model, vocab_size)
        self._init_parameters(num_blocks)
        if tie_weights:
            self.head.proj.weight = self.embedding.token.weight

    def _rotary_options(self, mixer: Callable[..., Mixer]) -> dict:
        """{"rotary": RotaryEmbedding} for mixers with queries and keys under rope positions."""
        if self.embedding.positional != "rope":
            return {}
        if _accepts(mixer, "rotary"):
            head_dim = self.d_model // self.num_heads
            return {"rotary": RotaryEmbedding(head_dim, base=self.embedding.rope_base)}
        # e.g. Mamba: order comes from its recurrence, as with model/embedding=none
        log.warning(
            "model/embedding=rope: mixer %s has no queries and keys to rotate, so the "
            "model gets no positional signal (the same as model/embedding=none)",
            getattr(getattr(mixer, "func", mixer), "__name__", mixer),
        )
        return {}

    def _init_parameters(self, num_blocks: int) -> None:
        """GPT-2's init, with residual projections scaled by 1/sqrt(2 * blocks)."""
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(tuple(f"{r}.weight" for r in RESIDUAL_PROJECTIONS)):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * num_blocks))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) for matrices and embeddings, zero biases. Mixers with their own init
        # (Mamba's dt, A) set `_skip_init = True` on the modules to leave alone.
        if getattr(module, "_skip_init", False):
            return
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def max_len(self) -> int | None:
        """Longest sequence the positional embedding supports (None: unbounded)."""
        return self.embedding.max_len if self.embedding.bounded else None

    def forward(self, idx: Tensor, caches: list[Cache] | None = None) -> Tensor:
        """idx: [B, T] -> logits [B, T, V]. With caches, continues the cached sequence."""
        h = self.hidden_states(idx, caches)
        return self.head(h)

    def hidden_states(
        self, idx: Tensor, caches: list[Cache] | None = None, tree: TreeStep | None = None
    ) -> Tensor:
        """Final-norm hidden states [B, T, D] (what the LM head, and any head a task adds,
        reads). With a TreeStep the T new tokens are nodes of a tree of candidate continuations
        after the cached sequence, verified in one pass."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time] token ids, got shape {tuple(idx.shape)}")
        if caches is not None and len(caches) != self.num_layers:
            raise ValueError(f"got {len(caches)} caches for {self.num_layers} layers")
        if tree is not None and not self.supports_tree:
            raise ValueError("this model's mixers cannot verify a tree in one pass")
        offset = caches[0].length if caches else 0
        x = self.embedding(idx, offset, None if tree is None else tree.positions)  # [B, T, D]
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, tree)
        return self.final_norm(x)

    @property
    def supports_tree(self) -> bool:
        """Whether every mixer verifies a tree of candidates with a tree attention mask."""
        return all(block.mixer.supports_tree for block in self.blocks)

    def init_caches(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> list[Cache]:
        """One empty decoding cache per layer."""
        return [
            block.mixer.init_cache(batch_size, max_len, device=device, dtype=dtype)
            for block in self.blocks
        ]

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count (tied weights counted once); optionally without the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.embedding.parameters())
        return n

    def flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Model FLOPs per token of a forward pass over seq_len tokens, by part: "mixer" (each
        mixer's projections and mixing), "mlp", "head" (LM head); "forward" is their sum and
        "train" = 3 x forward (lmkit.ops.flops: conventions)."""
        parts = {
            "mixer": sum(block.mixer.flops_per_token(seq_len) for block in self.blocks),
            "mlp": sum(linear_flops(block.mlp) for block in self.blocks),
            "head": linear_flops(self.head),
        }
        forward = sum(parts.values())
        return {**parts, "forward": forward, "train": train_flops(forward)}


def check_sizes(**sizes: int) -> None:
    """Every size >= 1 and d_model divisible by num_heads, each failure one line."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"model.{name}={value} must be >= 1")
    if sizes["d_model"] % sizes["num_heads"]:
        raise ValueError(
            f"model.d_model={sizes['d_model']} must be divisible by "
            f"model.num_heads={sizes['num_heads']}; change one of them"
        )


def _accepts(factory: Callable[..., Mixer], option: str) -> bool:
    """Whether the mixer's constructor (behind a functools.partial) takes `option`."""
    func = getattr(factory, "func", factory)
    try:
        return option in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return True
