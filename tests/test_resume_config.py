"""Resuming compares the whole config with the checkpoint's: only an explicit allow-list (and a
longer budget, with a warning) may differ unless the user accepts a difference by name."""

import logging

import pytest
import torch
from omegaconf import OmegaConf
from support import REPO, compose_config

from lmkit.run.checkpoint import adopt_init_from, check_same_run, load_checkpoint

STEP = 100  # the checkpoint's global step


def saved_config():
    """The config as a checkpoint stores it: resolved."""
    cfg = compose_config("trainer.max_steps=500", run_dir="/tmp/run")
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def resumed(*overrides):
    return compose_config("trainer.max_steps=500", *overrides, run_dir="/tmp/run")


def test_the_same_run_resumes():
    # only the resume switch itself differs from the checkpoint's config
    assert check_same_run(saved_config(), resumed("resume=true"), "last.ckpt", STEP) == ["resume"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("logger=wandb", "logger.wandb"),
        ("checkpoint.every_n_train_steps=7", "checkpoint.every_n_train_steps"),
        ("runtime.threads=1", "runtime.threads"),
        ("data.num_workers=2", "data.num_workers"),
        ("trainer.log_every_n_steps=1", "trainer.log_every_n_steps"),
        ("ngram.order=3", "ngram.order"),
    ],
)
def test_how_a_run_logs_checkpoints_and_executes_may_change(override, key):
    # the difference is seen, and let through
    assert key in check_same_run(saved_config(), resumed(override), "last.ckpt", STEP)


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.optimizer.lr=3e-3", "optim.optimizer.lr"),
        ("optim.min_lr=0.0", "optim.min_lr"),
        ("optim.warmup_steps=10", "optim.warmup_steps"),
        ("seed=7", "seed"),
        ("trainer.gradient_clip_val=0.5", "trainer.gradient_clip_val"),
        ("model.dropout=0.2", "model.dropout"),
    ],
)
def test_a_changed_setting_is_refused_by_name(override, key):
    with pytest.raises(ValueError, match="trained with other settings") as refused:
        check_same_run(saved_config(), resumed(override), "last.ckpt", STEP)
    message = str(refused.value)
    # named once, with both values, and the override that accepts it; copies (task.optimizer.lr,
    # data.seed, the mixer's dropout) are not listed beside their source
    assert message.count(f"{key}:") == 1 and f"resume_accept=[{key}]" in message
    assert "task.optimizer" not in message and "data.seed" not in message
    check_same_run(saved_config(), resumed(override, f"resume_accept=[{key}]"), "x", STEP)


def test_a_longer_budget_resumes_with_a_warning_and_a_spent_one_is_refused(caplog):
    with caplog.at_level(logging.WARNING, logger="lmkit.run.checkpoint"):
        check_same_run(saved_config(), resumed("trainer.max_steps=800"), "last.ckpt", STEP)
    assert "trainer.max_steps=800" in caplog.text and "cosine schedule" in caplog.text
    with pytest.raises(ValueError, match="leaves nothing to train"):
        check_same_run(saved_config(), resumed("trainer.max_steps=100"), "last.ckpt", STEP)


def test_init_from_takes_the_checkpoints_sections_but_this_runs_budget_and_seed(tmp_path):
    """A run started from a checkpoint's weights adopts its model, tokenizer and data, but the
    data section's copies of run-wide settings (seed, max_steps) stay this run's: the train
    loader must be as long as this run and drawn from its seed."""
    checkpoint = load_checkpoint(REPO / "tests" / "fixtures" / "medusa_legacy" / "base.ckpt")
    config = OmegaConf.create(checkpoint["lmkit"]["config"])
    config.seed, config.trainer.max_steps = 11, 1500  # the source run's own seed and budget
    # stored resolved, as checkpoints of the current layout are
    checkpoint["lmkit"]["config"] = OmegaConf.to_container(config, resolve=True)
    assert checkpoint["lmkit"]["config"]["data"]["max_steps"] == 1500
    torch.save(checkpoint, tmp_path / "source.ckpt")
    init = f"init_from={tmp_path / 'source.ckpt'}"
    cfg = compose_config(init, "trainer.max_steps=77", "seed=5", run_dir=tmp_path / "run")
    adopt_init_from(cfg)
    assert cfg.model.d_model == 24 and cfg.data.block_size == 16  # the checkpoint's model, data
    assert cfg.data.max_steps == 77 and cfg.data.seed == 5  # this run's budget and seed
