"""train(cfg): from a composed config to a trained, evaluated model and its results.json."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from lmkit.run.baselines import check_baselines, run_baselines
from lmkit.run.build import (
    build_datamodule,
    build_loggers,
    build_model,
    build_task,
    build_trainer,
    check_model_config,
)
from lmkit.run.callbacks import GracefulStop, MeasurementCallback
from lmkit.run.checkpoint import (
    AtomicCheckpointIO,
    adopt_init_from,
    check_run_dir,
    resume_checkpoint,
)
from lmkit.run.phases import PhaseClock
from lmkit.run.runtime import apply_runtime_settings, check_precision, compile_model, peak_memory_mb
from lmkit.task import LanguageModelTask

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict:
    """Train the model of cfg, evaluate it on val (and test), write results.json; return it."""
    started = time.perf_counter()
    clock = PhaseClock()
    clock.mark("imports and config")
    run_dir = Path(cfg.run_dir)
    init_state = adopt_init_from(cfg) if cfg.init_from else None  # may replace sections of cfg
    check_run(cfg, run_dir)
    ckpt_path, resumed_step = resume_checkpoint(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    clock.mark("checks")
    loggers = build_loggers(cfg, run_dir, resumed_step=resumed_step)
    clock.mark("loggers")
    trainer = build_trainer(cfg, run_dir, loggers=loggers, plugins=[AtomicCheckpointIO()])
    clock.mark("trainer")
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    clock.mark("data")
    task = build_run_task(cfg, datamodule, init_state)
    clock.mark("model")
    # weights_only: a resumed checkpoint is read without unpickling code.
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    clock.mark("fit")
    stopper = next(c for c in trainer.callbacks if isinstance(c, GracefulStop))
    if stopper.stopped_at is not None:  # SIGTERM/SIGINT: checkpointed, no final evaluation
        log.warning(
            "stopped at step %d; continue with resume=true hydra.run.dir=%s",
            stopper.stopped_at,
            run_dir,
        )
        return {"interrupted_at_step": stopper.stopped_at, "checkpoint": str(last_ckpt(run_dir))}
    # The final weights and full training state, whatever the validation schedule was.
    trainer.save_checkpoint(last_ckpt(run_dir), weights_only=False)
    clock.mark("final checkpoint")
    results = final_evaluation(trainer, task, datamodule)
    clock.mark("final evaluation")
    results["eval_protocol"] = (
        f"non-overlapping windows of {cfg.data.block_size} tokens (the context restarts at each "
        "window); the n-gram baseline keeps its whole history (docs/evaluation.md)"
    )
    results.update(run_figures(cfg, trainer, task, started, run_dir))
    if trainer.is_global_zero:
        results.update(run_baselines(cfg, datamodule))  # after wall_s: cached across runs
    clock.mark("n-gram baselines")
    finish_loggers(loggers)
    clock.mark("loggers' finish")
    results["phase_s"] = split_fit(clock.seconds, task)
    log.info("time by phase: %s", clock.summary())
    if trainer.is_global_zero:
        results["config"] = task.checkpoint_extras["config"]  # the config stays last
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def split_fit(seconds: dict[str, float], task: LanguageModelTask) -> dict[str, float]:
    """The phases with fit split into its training steps, its validations and the rest
    (Lightning's set-up and teardown, the sanity check, checkpoints at validations)."""
    phases = dict(seconds)
    fit = phases.pop("fit")
    steps, validation = sum(task.step_times), task.fit_val_seconds
    phases["fit: training steps"] = steps
    phases["fit: validation"] = validation
    phases["fit: rest"] = fit - steps - validation
    return phases


def check_run(cfg: DictConfig, run_dir: Path) -> None:
    """Every check that can fail in a second, before any data or model work; the run dir is
    created last, so a refused config leaves nothing behind."""
    check_model_config(cfg)
    apply_runtime_settings(cfg)
    if cfg.trainer.max_steps == -1 and not cfg.trainer.max_time:
        raise ValueError(
            "trainer.max_steps=-1 sets no step limit; give a time budget "
            "(trainer.max_time=00:00:15:00) or a number of steps"
        )
    check_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_algorithm")  # a Lightning flag users add
    if clip not in (None, "norm"):
        raise ValueError(
            f"trainer.gradient_clip_algorithm={clip}: lmkit clips by the gradients' total norm "
            "(trainer.gradient_clip_val); drop the option or set it to norm"
        )
    check_baselines(cfg)
    check_run_dir(run_dir)


def build_run_task(cfg: DictConfig, datamodule, init_state: dict | None) -> LanguageModelTask:
    """The model (from init_from's weights when given, compiled when asked) inside its task,
    which stores the resolved config and the tokenizer in every checkpoint."""
    model = build_model(cfg, datamodule.vocab_size)
    if init_state is not None:
        model.load_state_dict(init_state)
    if cfg.runtime.compile:
        compile_model(model)
    extras = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "tokenizer": datamodule.tokenizer.to_json(),
    }
    task = build_task(cfg, model, datamodule, extras)
    log.info(
        "model: %s parameters (%s non-embedding)",
        f"{task.model.num_params():,}",
        f"{task.model.num_params(non_embedding=True):,}",
    )
    return task


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.ckpt"


def final_evaluation(trainer: L.Trainer, task: LanguageModelTask, datamodule) -> dict:
    """val (and test) metrics of the final weights; fit's last validation when it scored them."""
    results: dict = {}
    started = time.perf_counter()
    for split, run in (("val", trainer.validate), ("test", trainer.test)):
        if split not in datamodule.split_names:
            continue
        if split == "val" and task.last_val and task.last_val["step"] == trainer.global_step:
            metrics = {f"val/{k}": v for k, v in task.last_val.items() if k != "step"}
        else:  # [] when the trainer scores no batch of the split (limit_*_batches=0)
            metrics = next(iter(run(task, datamodule=datamodule, verbose=False)), {})
        prefix = f"{split}/"
        results.update(
            {f"{split}_{k[len(prefix):]}": v for k, v in metrics.items() if k.startswith(prefix)}
        )
        results.pop(f"{split}_elapsed_s", None)  # a point of the loss-against-time curve
    if trainer.world_size > 1:  # data parallel: every rank must hold the same weights
        results["weights_checksum_per_rank"] = weight_checksums(trainer, task)
    results["final_eval_s"] = time.perf_counter() - started  # inside wall_s
    return results


def weight_checksums(trainer: L.Trainer, task: LanguageModelTask) -> list[list[float]]:
    """[sum, sum of squares] of every weight, in float64, per rank (gathered from all ranks)."""
    weights = [p.detach().double() for p in task.model.parameters()]
    local = torch.stack([sum(w.sum() for w in weights), sum(w.square().sum() for w in weights)])
    return trainer.strategy.all_gather(local).view(-1, 2).tolist()


def run_figures(cfg, trainer: L.Trainer, task: LanguageModelTask, started: float, run_dir) -> dict:
    """Size, speed, time and memory of the run (measurement callbacks' own time left out)."""
    steady = task.step_times[min(10, len(task.step_times) // 2) :] or task.step_times
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size * trainer.world_size
    measuring = sum(c.seconds for c in trainer.callbacks if isinstance(c, MeasurementCallback))
    return {
        "params": task.model.num_params(),
        "tokens_per_s": tokens_per_step / statistics.median(steady) if steady else None,
        "wall_s": time.perf_counter() - started - measuring,
        "fit_val_s": task.fit_val_seconds,  # validations during training (inside wall_s)
        "peak_mem_mb": peak_memory_mb(),
        "steps": trainer.global_step,  # optimizer steps taken (a time budget decides them)
        "tokens": trainer.global_step * tokens_per_step * trainer.accumulate_grad_batches,
        "checkpoint": str(last_ckpt(run_dir)),
    }


def finish_loggers(loggers: list) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts its own wandb run
