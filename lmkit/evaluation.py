"""Perplexity and bits per byte from summed token negative log-likelihoods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.words import count_words  # noqa: F401 (part of this module's interface)

IGNORE_INDEX = -100  # targets of padding positions (the last partial evaluation window)


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position NLL in nats (float32), 0 where targets == IGNORE_INDEX. [B, T, V], [B, T]."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)


def nll_sums(logits: Tensor, targets: Tensor, token_bytes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(total NLL, scored tokens, UTF-8 bytes of the scored tokens) of one batch, as float64."""
    scored = targets != IGNORE_INDEX
    nll = token_nll(logits, targets).double().sum()
    nbytes = token_bytes[targets[scored]].double().sum()
    return nll, scored.sum().double(), nbytes


def correct_count(logits: Tensor, targets: Tensor) -> Tensor:
    """Scored positions whose most likely token is the target (top-1 hits), as float64."""
    scored = targets != IGNORE_INDEX
    return (logits.argmax(-1)[scored] == targets[scored]).sum().double()


def summarize(
    nll_sum: float, tokens: float, nbytes: float, correct: float | None = None
) -> dict[str, float]:
    """loss = mean NLL per token (nats), ppl = exp(loss), bpb = NLL / (ln 2 * bytes), and
    acc = top-1 accuracy over the scored tokens when `correct` is given."""
    if tokens <= 0:
        raise ValueError("no tokens were scored; the evaluation split is empty")
    loss = nll_sum / tokens
    metrics = {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nll_sum / (math.log(2) * nbytes) if nbytes > 0 else float("nan"),
    }
    if correct is not None:
        metrics["acc"] = correct / tokens
    return metrics


def word_perplexity(nll_sum: float, words: int) -> float:
    """exp(total NLL / words): the perplexity per word of any tokenization (chars, BPE, words),
    comparable across tokenizers on the same text."""
    if words <= 0:
        raise ValueError("the split has no words to normalize by")
    return math.exp(min(nll_sum / words, 700.0))


def as_tensor(values: list[float] | Tensor) -> Tensor:
    return values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.float64)
