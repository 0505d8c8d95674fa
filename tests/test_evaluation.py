import math

import pytest
import torch

from lmkit.evaluation import IGNORE_INDEX, nll_sums, summarize


def test_sums_skip_padding_and_count_bytes():
    logits = torch.zeros(1, 4, 3)  # uniform over 3 tokens: NLL ln 3 per position
    targets = torch.tensor([[0, 2, 1, IGNORE_INDEX]])
    token_bytes = torch.tensor([1, 2, 3])
    nll, tokens, nbytes = nll_sums(logits, targets, token_bytes)
    assert tokens.item() == 3 and nbytes.item() == 1 + 3 + 2
    assert math.isclose(nll.item(), 3 * math.log(3), rel_tol=1e-6)
    m = summarize(nll.item(), tokens.item(), nbytes.item())
    assert math.isclose(m["ppl"], 3.0, rel_tol=1e-6)
    assert math.isclose(m["bpb"], 3 * math.log2(3) / 6, rel_tol=1e-6)


def test_words_are_whitespace_tokens_plus_one_end_of_line_per_line():
    from lmkit.evaluation import count_words, word_perplexity

    assert count_words("a b\nc\n\n d  e f\n") == 6 + 4  # six words, four lines
    assert count_words("") == 0
    assert word_perplexity(math.log(3.0) * 10, 10) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no words"):
        word_perplexity(1.0, 0)
