"""runtime.compile=true: torch.compile on the training forward; eager, with a message, on
failure."""

import functools
import logging

import pytest
import torch
from torch._inductor.exc import InvalidCxxCompiler

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
            raise InvalidCxxCompiler()  # inductor on a machine without g++

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


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CPU out of memory"), ValueError("a bug in the model")]
)
def test_errors_that_are_not_compilation_failures_propagate(monkeypatch, caplog, error):
    def failing(fn, **kwargs):
        def compiled(*args, **kw):
            raise error

        return compiled

    monkeypatch.setattr(torch, "compile", failing)
    model = tiny_model()
    compile_model(model)
    with caplog.at_level(logging.WARNING, logger="lmkit.run.runtime"):
        with pytest.raises(type(error)):
            model(torch.randint(0, 17, (2, 8)))
    assert "torch.compile failed" not in caplog.text
    assert model.forward.compiled is not None  # still compiled: no silent switch to eager


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
