import math

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
