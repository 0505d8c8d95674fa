"""Config -> objects: data module, model, task, loggers and trainer, each from its config group."""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lmkit.run.callbacks import DivergenceGuard, GracefulStop, TrainingProgressBar
from lmkit.run.sweep import sweep_group
from lmkit.task import LanguageModelTask


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The data module of cfg.data (its config interpolates tokenizer, seed and max_steps)."""
    return instantiate(cfg.data)


def build_model(cfg: DictConfig, vocab_size: int) -> nn.Module:
    """The model of cfg.model, eager (runtime.compile is applied by the training paths)."""
    return instantiate(cfg.model)(vocab_size=vocab_size)


def check_model_config(cfg: DictConfig) -> None:
    """Build the model and its task on the meta device (no memory, no init cost) so that a bad
    size or option fails in a second, before any data work."""
    with torch.device("meta"):
        build_task(cfg, build_model(cfg, vocab_size=2))


def build_task(
    cfg: DictConfig,
    model: nn.Module,
    datamodule: L.LightningDataModule | None = None,
    extras: dict | None = None,
) -> LanguageModelTask:
    """The task of cfg.task around model; the data module gives bytes per token (bits per
    byte) and word counts (per-word perplexity) where its data has them."""
    token_bytes = word_counts = None
    if datamodule is not None:
        token_bytes = torch.as_tensor(datamodule.tokenizer.token_bytes)
        word_counts = datamodule.word_counts() if hasattr(datamodule, "word_counts") else None
    return instantiate(cfg.task, _convert_="all")(
        model, token_bytes=token_bytes, word_counts=word_counts, checkpoint_extras=extras
    )


def wandb_mode(requested: str) -> str:
    """'online' when an API key is configured (env or ~/.netrc), else 'offline', unless forced."""
    if requested in ("online", "offline"):
        return requested
    if requested != "auto":
        raise ValueError(f"logger.mode={requested!r}; choose auto, online or offline")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def build_loggers(cfg: DictConfig, run_dir: Path, *, resumed_step: int = 0) -> list[Logger]:
    """CSV metrics (run_dir/metrics.csv) always; wandb when cfg.logger.wandb."""
    # Hydra's own files share the run dir; the CSV logger only replaces its metrics.csv.
    warnings.filterwarnings("ignore", message="Experiment logs directory .* is not empty")
    # A resumed run writes its metrics beside the first attempt's instead of replacing them.
    version = f"resumed_from_step{resumed_step}" if resumed_step else ""
    loggers: list[Logger] = [CSVLogger(run_dir, name="", version=version)]
    if cfg.logger.wandb:
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                name=cfg.logger.name,
                group=cfg.logger.group or sweep_group(),  # one group per sweep
                save_dir=str(run_dir),
                offline=wandb_mode(cfg.logger.mode) == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """Checkpoints (the best by val loss, and last.ckpt), progress, clean stops, the divergence
    guard, and the callbacks of cfg.callbacks (e.g. callbacks=layer_bench)."""
    checkpoints = run_dir / "checkpoints"
    return [
        ModelCheckpoint(  # the best by val/loss (saved when validation runs)
            dirpath=checkpoints,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            mode="min",
            save_top_k=cfg.checkpoint.save_top_k,
        ),
        # last.ckpt at every validation and every_n_train_steps, unconditionally (a monitored
        # checkpoint would wait for the first validation)
        ModelCheckpoint(
            dirpath=checkpoints,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        ),
        TrainingProgressBar(),
        GracefulStop(checkpoints / "last.ckpt"),
        DivergenceGuard(),
        *(instantiate(c) for c in cfg.callbacks.values()),
    ]


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    loggers: list[Logger] | None = None,
    extra_callbacks: list[L.Callback] | None = None,
    **overrides,
) -> L.Trainer:
    """The Lightning Trainer of cfg.trainer with lmkit's callbacks; overrides (plugins=...,
    limit_val_batches=...) go to the Trainer as they are."""
    return instantiate(
        cfg.trainer,
        callbacks=[*build_callbacks(cfg, run_dir), *(extra_callbacks or [])],
        logger=loggers or False,
        default_root_dir=str(run_dir),
        **overrides,
    )
