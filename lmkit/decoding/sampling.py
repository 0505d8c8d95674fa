"""Autoregressive sampling with every mixer's decoding cache (no recomputation of the prefix)."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(
    logits: Tensor, *, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: [B, V]."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row from logits [B, V] -> [B, 1]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def check_sampling_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 (or null for no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or null for no limit)")


@torch.no_grad()
def generate(
    model,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue idx [B, T0] by max_new_tokens sampled tokens -> [B, T0 + max_new_tokens].

    The prompt is prefilled once, then each step feeds one token through the caches. A model with
    bounded positions (learned/sinusoidal, max_len) keeps a sliding context: when the cache is
    full it is rebuilt from the last max_len // 2 tokens, so long generations stay possible.
    """
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, time>=1] token ids, got {tuple(idx.shape)}")
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    context = model.max_len or idx.shape[1] + max_new_tokens
    tokens = [idx]

    def prefill(ids: Tensor) -> tuple[list, Tensor]:
        caches = model.init_caches(ids.shape[0], context, device=ids.device, dtype=dtype)
        return caches, model(ids, caches)[:, -1]  # [B, V]

    caches, logits = prefill(idx[:, -context:])
    for step in range(max_new_tokens):
        nxt = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )  # [B, 1]
        tokens.append(nxt)
        if step == max_new_tokens - 1:
            break
        if caches[0].length >= context:
            caches, logits = prefill(torch.cat(tokens, 1)[:, -max(context // 2, 1) :])
        else:
            logits = model(nxt, caches)[:, -1]
    model.train(was_training)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def greedy_continuations(model, windows: Tensor, prompt_len: int) -> Tensor:
    """windows [B, T] -> [B, T]: each window's first prompt_len tokens continued by the model's
    greedy decoding (the text that greedy speculative decoding verifies against: targets for
    self-distilled draft heads, calibration text for their candidate trees)."""
    if not 1 <= prompt_len < windows.shape[1]:
        raise ValueError(
            f"a prompt of {prompt_len} tokens leaves nothing to continue in windows of "
            f"{windows.shape[1]} tokens; use 1 <= prompt < {windows.shape[1]}"
        )
    return generate(model, windows[:, :prompt_len], windows.shape[1] - prompt_len, temperature=0)
