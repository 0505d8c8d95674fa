"""MedusaLM: the heads on a DecoderLM; as a language model it is its base."""

from functools import partial

import torch

from lmkit.medusa.model import MedusaLM
from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.mlp import MLP

V, D, H, L, T = 11, 8, 2, 2, 5


def base() -> DecoderLM:
    mixer = partial(SoftmaxAttention, num_heads=H, backend="naive")
    return DecoderLM(V, mixer=mixer, mlp=partial(MLP), d_model=D, num_layers=L, num_heads=H)


def test_heads_flops_are_counted_on_top_of_the_base():
    model = MedusaLM(base(), 3)
    f, plain = model.flops_per_token(T), model.base.flops_per_token(T)
    assert f["heads"] == 3 * (2 * D * D + 2 * D * V)  # residual block + vocabulary projection
    assert f["forward"] == plain["forward"] + f["heads"] and f["train"] == 3 * f["forward"]


def test_as_a_language_model_it_is_its_base_and_heads_start_as_the_lm_head():
    model = MedusaLM(base(), 2)
    idx = torch.randint(0, V, (2, T))
    torch.testing.assert_close(model(idx), model.base(idx), rtol=0, atol=0)
    h = model.hidden_states(idx)
    for logits in model.heads(h):  # zero residual blocks, projections copied from the LM head
        torch.testing.assert_close(logits, model.head(h))
    heads = sum(p.numel() for p in model.heads.parameters())
    assert model.num_params() == model.base.num_params() + heads
