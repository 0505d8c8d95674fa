"""runtime.compile=true: torch.compile on the training forward; eager, with a message, on
failure."""

import functools
import logging

import pytest
import torch

from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.mlp import MLP
from lmkit.run.runtime import CompileOrEager, compile_model


def tiny_model() -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(
        17,
        mixer=functools.partial(SoftmaxAttention, num_heads=2),
        mlp=functools.partial(MLP),
        d_model=16,
        num_layers=1,
        num_heads=2,
    )


def test_a_backend_that_cannot_compile_falls_back_to_eager_with_one_message(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\\nmore text")

        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    model, reference = tiny_model(), tiny_model()
    compile_model(model)
    assert isinstance(model.forward, CompileOrEager)
    idx = torch.randint(0, 17, (2, 8))
    with caplog.at_level(logging.WARNING, logger="lmkit.run.runtime"):
        for _ in range(3):
            out = model(idx)
    torch.testing.assert_close(out, reference(idx))
    failures = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(failures) == 1 and "No working C++ compiler" in failures[0].getMessage()
    assert model.state_dict().keys() == reference.state_dict().keys()  # checkpoints unchanged


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager():
    model, reference = tiny_model(), tiny_model()
    compile_model(model)
    idx = torch.randint(0, 17, (2, 8))
    out, expected = model(idx), reference(idx)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
