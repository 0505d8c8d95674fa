import functools
import math

import pytest
import torch
from torch import nn

from lmkit.evaluation import IGNORE_INDEX
from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.mlp import MLP
from lmkit.task import LanguageModelTask, masked_mean_nll, param_groups, warmup_cosine


def tiny_model(norm: str = "layernorm") -> DecoderLM:
    return DecoderLM(
        40,
        d_model=32,
        num_layers=2,
        num_heads=4,
        norm=norm,
        mixer=functools.partial(SoftmaxAttention, num_heads=4, bias=True),
        mlp=functools.partial(MLP, bias=True),
    )


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_param_groups_decay_matrices_only(norm):
    model = tiny_model(norm)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "norm" not in n and "embedding" not in n for n in decayed)
    assert "embedding.token.weight" in kept and "embedding.position.weight" in kept
    assert any(n.endswith("bias") for n in kept) and any("norm" in n for n in kept)
    assert "blocks.0.mixer.qkv.weight" in decayed and "blocks.1.mlp.down_proj.weight" in decayed
    # every parameter exactly once; the tied head weight is the embedding (not decayed)
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_marked_tensors_are_not_decayed():
    layer = nn.Linear(4, 4)
    layer.weight._no_weight_decay = True
    decay, no_decay = param_groups(layer, 0.1)
    assert not decay["params"] and len(no_decay["params"]) == 2


def test_adamw_decay_is_decoupled_from_the_gradient():
    lr, wd, g = 0.1, 0.5, torch.tensor([0.3, -2.0])
    p0 = torch.tensor([1.0, -1.0])

    def one_step(opt_cls):
        p = nn.Parameter(p0.clone())
        opt = opt_cls([p], lr=lr, weight_decay=wd, betas=(0.9, 0.99), eps=1e-8)
        p.grad = g.clone()
        opt.step()
        return p.detach()

    # AdamW: p <- p - lr * wd * p - lr * m_hat / (sqrt(v_hat) + eps);
    # on the first step m_hat / sqrt(v_hat) = sign(g).
    expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(one_step(torch.optim.AdamW), expected)
    # Adam + L2 folds wd * p into the gradient, which the normalisation then washes out.
    g_l2 = g + wd * p0
    torch.testing.assert_close(one_step(torch.optim.Adam), p0 - lr * g_l2 / (g_l2.abs() + 1e-8))
    assert not torch.allclose(one_step(torch.optim.AdamW), one_step(torch.optim.Adam))


def test_warmup_then_cosine_to_floor():
    f = functools.partial(warmup_cosine, warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_the_cosine_follows_whichever_budget_binds():
    spent = [0.0]
    f = functools.partial(
        warmup_cosine, warmup_steps=10, max_steps=110, min_ratio=0.1, time_fraction=lambda: spent[0]
    )
    assert f(60) == pytest.approx(0.55)  # half the steps, no time spent: the step schedule
    spent[0] = 0.75  # three quarters of the time budget: time binds
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    spent[0] = 1.0
    assert f(11) == pytest.approx(0.1)  # the deadline: at the floor whatever the step
    time_only = functools.partial(
        warmup_cosine, warmup_steps=10, max_steps=-1, min_ratio=0.1, time_fraction=lambda: 0.5
    )
    assert time_only(5) == pytest.approx(0.6) and time_only(10**6) == pytest.approx(0.55)


def trained_tiny_model(steps: int = 30):
    """tiny_model fitted in fp32 to y_t = perm[x_(t-1)] (y_0 unscored): after `steps` AdamW
    steps its predictions are confident, so its loss is far below ln V and sensitive to any error
    in the logits, unlike an untrained model's loss, which stays near ln V whatever the logits."""
    torch.manual_seed(0)
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 40, (8, 32), generator=g)
    y = torch.randperm(40, generator=g)[x.roll(1, dims=1)]
    y[:, 0] = IGNORE_INDEX
    task = LanguageModelTask(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        task.training_loss(x, y, logging=False).backward()
        optimizer.step()
    optimizer.zero_grad()
    return task, x, y


def reference_nll(logits, y):
    """Mean NLL of the scored targets in float64, from the definition: logsumexp - target logit."""
    logits, scored = logits.double(), y != IGNORE_INDEX
    target = logits.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return (logits.logsumexp(-1) - target)[scored].mean()


def test_bf16_autocast_loss_matches_fp32():
    task, x, y = trained_tiny_model()
    params = list(task.model.parameters())

    def loss_and_grads(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = task.model(x)
            loss = task.training_loss(x, y, logging=False)
        return logits.detach(), loss, torch.autograd.grad(loss, params)

    logits32, loss32, grads32 = loss_and_grads(False)
    logits16, loss16, grads16 = loss_and_grads(True)
    # A confident model: the loss is far from ln V = 3.69, where any logits would pass.
    assert 0.05 < loss32.item() < 1.0, loss32.item()
    assert logits16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert math.isclose(loss32.item(), reference_nll(logits32, y).item(), rel_tol=1e-5)
    # bf16 matmuls move this loss by about 2e-4 (0.05 %); 1 % is far beyond that rounding.
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item(), (loss16, loss32)
    # Gradients: every tensor within 10 % (bf16 rounding moves each by 1 to 3.5 %).
    for (name, _), g16, g32 in zip(task.model.named_parameters(), grads16, grads32, strict=True):
        err = ((g16 - g32).norm() / g32.norm()).item()
        assert err < 0.1, f"{name}: gradient differs by {err:.1%} under bf16 autocast"
    # The loss of bf16 logits outside autocast (a bf16 model, or logits kept from an autocast
    # forward) is still computed in float32: exactly the float64 NLL of those very logits.
    # A bf16 log-softmax would be off by about 6e-4 here.
    nll16 = masked_mean_nll(logits16, y)
    err = abs(nll16.item() - reference_nll(logits16, y).item())
    assert err < 1e-6, f"the NLL of bf16 logits is off by {err:.2g}: not computed in float32"
    assert nll16.dtype == torch.float32


def test_task_refuses_bad_optimisation_settings():
    opt = functools.partial(torch.optim.AdamW, lr=0.0)
    with pytest.raises(ValueError, match="lr=0.0 must be positive"):
        LanguageModelTask(tiny_model(), optimizer=opt)
    with pytest.raises(ValueError, match="max_steps=0"):
        LanguageModelTask(
            tiny_model(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), max_steps=0
        )


def test_adamw_is_fused_unless_told_otherwise():
    factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert (
        LanguageModelTask(tiny_model(), optimizer=factory)
        .configure_optimizers()["optimizer"]
        .defaults["fused"]
    )
    for choice in ({"foreach": True}, {"fused": False}):  # an explicit choice is kept
        chosen = functools.partial(torch.optim.AdamW, lr=1e-3, **choice)
        optimizer = LanguageModelTask(tiny_model(), optimizer=chosen).configure_optimizers()
        assert not optimizer["optimizer"].defaults.get("fused")


def test_fused_adamw_steps_like_the_default_loop():
    """The fused CPU kernel makes the same updates as torch's per-tensor loop."""
    models = [tiny_model(), tiny_model()]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        torch.optim.AdamW(models[0].parameters(), lr=1e-2, weight_decay=0.1, fused=True),
        torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, foreach=False),
    ]
    x = torch.randint(0, 40, (2, 16))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers, strict=True):
            model(x).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
