"""Medusa heads on a trained base: Medusa-1 trains only the heads, Medusa-2 both; every head
learns; per-head accuracy is reported; the checkpoint restores with its heads."""

import pytest
import torch
from omegaconf import open_dict
from support import compose_config

from lmkit.checkpoint import restore
from lmkit.model.heads import medusa_targets
from lmkit.task import LanguageModelTask
from lmkit.training import build_model, load_base_weights, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    cfg = compose_config("trainer.max_steps=30", "ngram.enabled=false", run_dir=run_dir)
    results = train(cfg)
    return run_dir / "checkpoints" / "last.ckpt", results


def medusa_run(tmp_path, base_ckpt, *extra):
    cfg = compose_config(
        "experiment=medusa",
        f"base_ckpt={base_ckpt}",
        "medusa.num_heads=3",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        *extra,
        run_dir=tmp_path / "medusa",
    )
    return cfg, train(cfg)


def test_medusa1_trains_heads_only(tmp_path, base_ckpt):
    base_ckpt, base_results = base_ckpt
    cfg, results = medusa_run(tmp_path, base_ckpt, "medusa.distill_prompt=0")  # on the data
    for k in (1, 2, 3):
        assert 0.0 <= results[f"val_medusa{k}_acc"] <= 1.0
    base, tuned = restore(base_ckpt).model, restore(cfg.run_dir + "/checkpoints/last.ckpt").model
    assert len(tuned.medusa) == 3
    for name, p in base.state_dict().items():  # the base is frozen: unchanged
        torch.testing.assert_close(tuned.state_dict()[name], p, rtol=0, atol=0)
    for head in tuned.medusa.heads:  # every head moved away from its initialisation
        assert head.block.weight.abs().sum() > 0
        assert not torch.equal(head.proj.weight, tuned.head.proj.weight)
    # the base model's own loss is unchanged by Medusa-1 (same weights, same val tokens)
    assert results["val_loss"] == pytest.approx(base_results["val_loss"], rel=1e-6)


def test_medusa2_trains_base_and_heads(tmp_path, base_ckpt):
    base_ckpt, _ = base_ckpt
    cfg, _ = medusa_run(tmp_path, base_ckpt, "medusa.joint=true", "medusa.distill_prompt=0")
    base, tuned = restore(base_ckpt).model, restore(cfg.run_dir + "/checkpoints/last.ckpt").model
    changed = [n for n, p in base.state_dict().items() if not torch.equal(tuned.state_dict()[n], p)]
    assert any(n.startswith("blocks.") for n in changed)


def heads_on_base(base_ckpt, num_heads: int):
    """(base model, the same model with num_heads Medusa-1 heads started from its LM head)."""
    restored = restore(base_ckpt)
    model, cfg = restored.model, restored.config
    with open_dict(cfg):
        cfg.model.medusa_heads = num_heads
    medusa = build_model(cfg, model.vocab_size)
    load_base_weights(medusa, model.state_dict(), joint=False)
    return model, medusa


def test_every_head_gets_gradients(base_ckpt):
    model, medusa = heads_on_base(base_ckpt[0], 4)
    task = LanguageModelTask(medusa, optimizer=torch.optim.AdamW, max_steps=1)
    task.log = lambda *a, **k: None
    x = torch.randint(0, model.vocab_size, (2, 16))
    task.training_step((x[:, :-1], x[:, 1:]), 0).backward()
    for k, head in enumerate(medusa.medusa.heads, start=1):
        assert head.block.weight.grad is not None and head.block.weight.grad.abs().sum() > 0, k
        assert head.proj.weight.grad.abs().sum() > 0, k
    assert all(p.grad is None for n, p in medusa.named_parameters() if not n.startswith("medusa."))
    assert medusa_targets(x[:, 1:], 4)[:, -4:].eq(-100).all()


def test_self_distillation_targets_are_the_base_models_greedy_tokens(base_ckpt):
    model, medusa = heads_on_base(base_ckpt[0], 2)
    task = LanguageModelTask(medusa, optimizer=torch.optim.AdamW, medusa_distill_prompt=5)
    x = torch.randint(0, model.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    inputs, targets = task.greedy_windows(x)
    assert inputs.shape == targets.shape == (3, 19) and torch.equal(inputs[:, :5], x[:, :5])
    assert torch.equal(inputs[:, 5:], targets[:, 4:-1])
    assert targets[:, :4].eq(-100).all()  # the prompt's own tokens are data: not learned
    # from the prompt on, every target is the base model's argmax after the tokens before it
    assert torch.equal(targets[:, 4:], model(inputs).argmax(-1)[:, 4:])
    assert not torch.equal(inputs, x[:, :-1])
    task.medusa_distill_prompt = 20
    with pytest.raises(ValueError, match="leaves nothing to continue"):
        task.greedy_windows(x)
    with pytest.raises(ValueError, match="needs medusa.joint=false"):
        LanguageModelTask(
            medusa, optimizer=torch.optim.AdamW, medusa_distill_prompt=5, medusa_joint=True
        )


def test_self_distillation_decodes_in_full_precision_under_autocast(base_ckpt):
    model = restore(base_ckpt[0]).model
    task = LanguageModelTask(model, optimizer=torch.optim.AdamW, medusa_distill_prompt=4)
    x = torch.randint(0, model.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    plain = task.greedy_windows(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = task.greedy_windows(x)
    assert torch.equal(plain[0], autocast[0]) and torch.equal(plain[1], autocast[1])


def test_self_distillation_errors_come_before_any_work(tmp_path, base_ckpt):
    with pytest.raises(ValueError, match="base would learn from itself"):
        medusa_run(tmp_path, base_ckpt[0], "medusa.joint=true")
    with pytest.raises(ValueError, match=r"distill_prompt=32 must be in \[0, 32\)"):
        medusa_run(tmp_path / "long", base_ckpt[0], "medusa.distill_prompt=32")
    assert not (tmp_path / "medusa").exists() and not (tmp_path / "long").exists()


def test_self_distilled_heads_train_on_a_frozen_base(tmp_path, base_ckpt, monkeypatch):
    base_ckpt, base_results = base_ckpt
    calls = []
    greedy_windows = LanguageModelTask.greedy_windows
    monkeypatch.setattr(
        LanguageModelTask,
        "greedy_windows",
        lambda self, x: calls.append(x.shape) or greedy_windows(self, x),
    )
    cfg, results = medusa_run(tmp_path, base_ckpt)  # the default: self-distillation
    assert cfg.medusa.distill_prompt > 0 and len(calls) == 20  # every training step
    base, tuned = restore(base_ckpt).model, restore(cfg.run_dir + "/checkpoints/last.ckpt").model
    for name, p in base.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[name], p, rtol=0, atol=0)
    assert all(head.block.weight.abs().sum() > 0 for head in tuned.medusa.heads)
    assert results["val_loss"] == pytest.approx(base_results["val_loss"], rel=1e-6)


def test_base_with_heads_is_refused(tmp_path, base_ckpt):
    cfg, _ = medusa_run(tmp_path, base_ckpt[0])
    with pytest.raises(ValueError, match="already has Medusa heads"):
        medusa_run(tmp_path / "again", cfg.run_dir + "/checkpoints/last.ckpt")


def test_generate_and_bench_scripts_decode_with_medusa(tmp_path, base_ckpt):
    import json
    import os
    import subprocess
    import sys

    from support import REPO

    cfg, _ = medusa_run(tmp_path, base_ckpt[0])
    ckpt = cfg.run_dir + "/checkpoints/last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def script(*args):
        return subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )

    out = script(
        "scripts/generate.py",
        f"ckpt={ckpt}",
        "decoding=medusa",
        "max_new_tokens=12",
        "prompt=ROMEO:",
        "tree_nodes=6",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ROMEO:") and "tokens/step" in out.stderr
    bench = script(
        "scripts/medusa_bench.py",
        f"ckpt={ckpt}",
        "prompts=2",
        "prompt_len=4",
        "max_new_tokens=8",
        "tree_nodes=6",
    )
    assert bench.returncode == 0, bench.stderr[-2000:]
    report = json.loads(bench.stdout.strip().splitlines()[-1])
    assert report["identical_outputs"] == "2/2" and report["tokens_per_step"] >= 1.0
