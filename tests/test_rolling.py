"""Rolling-window scoring against independent references: a slow loop that gives every token
exactly its context, plain non-overlapping windows, and lm-evaluation-harness's own windows."""

from __future__ import annotations

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows
from support import compose_config

from lmkit.rolling import rolling_nll, rolling_windows
from lmkit.run.build import build_model

CONTEXT = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = compose_config("model/embedding=rope", "model.num_layers=2", run_dir="/tmp/unused")
    return build_model(cfg, vocab_size=50).eval()


@pytest.mark.parametrize("length", [1, 2, 5, 16, 17, 40, 97])
@pytest.mark.parametrize("stride", [1, 5, 16])
def test_windows_score_every_target_once_with_the_promised_context(length, stride):
    windows = rolling_windows(length, CONTEXT, stride)
    scored = [t for w in windows for t in range(w.stop - w.scored + 1, w.stop + 1)]
    assert scored == list(range(1, length))
    for w in windows[1:]:
        assert w.stop - w.start == CONTEXT  # later windows are full
        assert w.stop - w.scored + 1 - w.start >= CONTEXT - stride  # the first scored sees this


@pytest.mark.parametrize("length", [3, 16, 17, 40, 97])
@pytest.mark.parametrize("stride", [1, 7, 16])
def test_windows_are_the_harness_rolling_windows(length, stride):
    stream = list(range(100, 100 + length))  # stream[0] plays the harness's prefix token
    ours = [
        (stream[w.start : w.stop], stream[w.stop - w.scored + 1 : w.stop + 1])
        for w in rolling_windows(length, CONTEXT, stride)
    ]
    theirs = get_rolling_token_windows(stream[1:], stream[0], CONTEXT, CONTEXT - stride + 1)
    assert ours == [(list(a), list(b)) for a, b in theirs]


def test_stride_one_gives_every_token_exactly_its_context(model):
    tokens = torch.randint(0, 50, (41,))
    (nll,) = rolling_nll(model, [tokens], CONTEXT, 1, batch_size=5)
    with torch.no_grad():
        for t in range(1, len(tokens)):  # target t after at most CONTEXT tokens before it
            logits = model(tokens[max(t - CONTEXT, 0) : t][None])[0, -1]
            expected = -torch.log_softmax(logits, -1)[tokens[t]]
            torch.testing.assert_close(nll[t - 1], expected, rtol=1e-5, atol=1e-5)


def test_stride_context_is_the_non_overlapping_windows(model):
    tokens = torch.randint(0, 50, (3 * CONTEXT + 1,))  # three whole windows
    (nll,) = rolling_nll(model, [tokens], CONTEXT, CONTEXT)
    x, y = tokens[:-1].view(3, CONTEXT), tokens[1:].view(3, CONTEXT)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            model(x).flatten(0, 1), y.flatten(), reduction="none"
        )
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [["model/mixer=softmax"], ["model/mixer=mamba"], ["model=hourglass", "model.num_layers=4"]],
    ids=["softmax", "mamba", "hourglass"],
)
def test_streams_batched_together_score_as_alone(overrides):
    torch.manual_seed(0)
    cfg = compose_config(*overrides, run_dir="/tmp/unused")
    model = build_model(cfg, vocab_size=50).eval()
    streams = [torch.randint(0, 50, (n,)) for n in (5, 40, 1, 23)]  # short ones are padded
    together = rolling_nll(model, streams, CONTEXT, 6, batch_size=3)
    for stream, nll in zip(streams, together, strict=True):
        (alone,) = rolling_nll(model, [stream], CONTEXT, 6, batch_size=1)
        assert nll.shape == (max(len(stream) - 1, 0),)
        torch.testing.assert_close(nll, alone, rtol=1e-5, atol=1e-5)


def test_bad_stride_is_one_clear_error():
    with pytest.raises(ValueError, match=r"eval.stride=17 must be in \[1, 16\]"):
        rolling_windows(40, CONTEXT, 17)
    with pytest.raises(ValueError, match="eval.stride=0"):
        rolling_windows(40, CONTEXT, 0)
