"""Rolling-window scoring: every token of a stream with up to a full context behind it.

Training's validation cuts a stream into non-overlapping windows of ``context`` tokens, so the
context restarts at every window border and the first tokens of each window are predicted from
almost nothing. A rolling evaluation moves a window of ``context`` tokens along the stream and
scores only the targets no earlier window scored: the first window scores its ``context``
targets, each later one the next ``stride`` targets (fewer at the end) with the ``context``
tokens before its last target as input. Every target after the first window so sees at least
``context - stride`` tokens before it (``stride=1``: exactly ``min(context, position)``), and
every target is scored once, so the total equals the fixed-window total's token count.

These are lm-evaluation-harness's rolling windows (``get_rolling_token_windows`` with
``context_len = context - stride + 1``), so a document scored here and through the harness
adapter gives the same log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmkit.evaluation import IGNORE_INDEX, token_nll


@dataclass(frozen=True)
class Window:
    """Inputs ``stream[start:stop]``; targets ``stream[start + 1 : stop + 1]``, of which the
    last ``scored`` count."""

    start: int
    stop: int
    scored: int


def check_rolling(context: int, stride: int) -> None:
    if context < 1:
        raise ValueError(f"context={context} must be >= 1 token")
    if not 1 <= stride <= context:
        raise ValueError(
            f"eval.stride={stride} must be in [1, {context}] (the model's context): each window "
            f"scores `stride` new tokens; stride={context} scores whole windows"
        )


def rolling_windows(length: int, context: int, stride: int) -> list[Window]:
    """The windows that score targets 1..length-1 of a stream of `length` tokens."""
    check_rolling(context, stride)
    targets = length - 1
    if targets < 1:
        return []
    first = min(context, targets)
    windows = [Window(0, first, first)]
    done = first  # targets 1..done are scored
    while done < targets:
        scored = min(stride, targets - done)
        end = done + scored  # this window's last target
        windows.append(Window(max(end - context, 0), end, scored))
        done = end
    return windows


@torch.no_grad()
def rolling_nll(
    model: Callable[[Tensor], Tensor],
    streams: Sequence[Tensor],
    context: int,
    stride: int,
    *,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[Tensor]:
    """Per-target NLL (nats, float32) of each 1-D token stream: [len(stream) - 1] each, the
    target at position t+1 in entry t. Windows of all streams are batched together (a short
    stream's window is right-padded, which a causal model does not see); `progress` is called
    with the number of windows done after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    jobs = [
        (s, w)
        for s, stream in enumerate(streams)
        for w in rolling_windows(len(stream), context, stride)
    ]
    out = [torch.empty(max(len(stream) - 1, 0)) for stream in streams]
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        inputs, targets = _window_batch(streams, batch)
        device = _device_of(model)
        nll = token_nll(model(inputs.to(device)), targets.to(device)).cpu()
        for row, (s, w) in enumerate(batch):
            width = w.stop - w.start
            out[s][w.stop - w.scored : w.stop] = nll[row, width - w.scored : width]
        if progress is not None:
            progress(len(batch))
    return out


def _window_batch(
    streams: Sequence[Tensor], batch: Sequence[tuple[int, Window]]
) -> tuple[Tensor, Tensor]:
    """[B, W] inputs (0-padded) and targets (IGNORE_INDEX where not scored)."""
    width = max(w.stop - w.start for _, w in batch)
    inputs = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (s, w) in enumerate(batch):
        n = w.stop - w.start
        inputs[row, :n] = streams[s][w.start : w.stop]
        targets[row, n - w.scored : n] = streams[s][w.stop - w.scored + 1 : w.stop + 1]
    return inputs, targets


def _device_of(model) -> torch.device:
    params = getattr(model, "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")
