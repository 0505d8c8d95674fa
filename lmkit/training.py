"""From a composed config to a trained model: build every part, check it, fit, evaluate, report."""

from __future__ import annotations

import ctypes
import json
import logging
import netrc
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from lmkit.callbacks import DivergenceGuard, GracefulStop, TrainingProgressBar
from lmkit.checkpoint import AtomicCheckpointIO, resume_checkpoint
from lmkit.data.datamodule import TextDataModule
from lmkit.model.decoder import DecoderLM
from lmkit.ngram import baseline_metrics, check_baseline_config
from lmkit.sweep import sweep_group
from lmkit.task import LanguageModelTask

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> TextDataModule:
    """The data module of cfg.data with cfg.tokenizer, seeded and sized by the run."""
    tokenizer = OmegaConf.to_container(cfg.tokenizer, resolve=True)
    return instantiate(
        cfg.data, tokenizer=tokenizer, seed=cfg.seed, max_steps=cfg.trainer.max_steps
    )


def word_level_baseline(cfg: DictConfig) -> dict[str, Any]:
    """The n-gram of cfg.ngram fitted on the same data split into words (tokenizer=word: the
    train split's whitespace words plus end of line; words the train split lacks are <unk>): the
    word-level model of the literature, whose perplexity faces a BPE or char run's per-word one."""
    word_cfg = cfg.copy()  # a deep copy: the run's config keeps its tokenizer
    word_cfg.tokenizer = OmegaConf.create({"kind": "word"})
    word_cfg.data.block_size = 1  # the n-gram reads no windows; words are fewer than tokens
    datamodule = build_datamodule(word_cfg)
    baseline = baseline_metrics(datamodule, cfg.ngram.order, cfg.ngram.discount)
    log.info(
        "word-level n-gram baseline (KN%d): %s",
        baseline["order"],
        ", ".join(f"{s} ppl {baseline[s]['ppl']:.2f}" for s in ("val", "test") if s in baseline),
    )
    return baseline


def build_model(cfg: DictConfig, vocab_size: int) -> DecoderLM:
    """The model of cfg.model (eager; `model.compile` is applied by the training paths)."""
    model_cfg = cfg.model
    if "compile" in model_cfg:  # an execution option, not an argument of the model
        model_cfg = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
        model_cfg.pop("compile")
    return instantiate(model_cfg)(vocab_size=vocab_size)


class CompileOrEager:
    """A module's forward under torch.compile that falls back to eager, with one logged
    message, when the backend cannot compile it (no C++ compiler for inductor on CPU, an
    unsupported platform, an operation dynamo cannot trace). Compilation happens on the
    first call; that call runs eager again if it fails."""

    def __init__(self, forward: Callable) -> None:
        self.eager = forward
        self.compiled: Callable | None = torch.compile(forward)

    def __call__(self, *args, **kwargs):
        if len(args) > 1 or kwargs.get("caches") is not None:
            return self.eager(*args, **kwargs)  # decoding with caches: shapes change every call
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # the backend's failure, whatever its type
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                log.warning(
                    "model.compile=true: torch.compile failed (%s: %s); training runs eager",
                    type(err).__name__,
                    reason,
                )
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_model(model: nn.Module) -> nn.Module:
    """Compile the model's forward in place (parameter names and checkpoints are unchanged).
    Calls with caches (decoding) stay eager. Medusa training reads hidden_states, so it runs
    eager too: compile speeds up the plain LM forward only."""
    model.forward = CompileOrEager(model.forward)
    log.info("model.compile=true: the training forward is compiled on its first call")
    return model


def check_model_config(cfg: DictConfig) -> None:
    """Build the model on the meta device (no memory, no init cost) so that a bad size or option
    fails in a second, before any data work."""
    with torch.device("meta"):
        build_model(cfg, vocab_size=2)


def build_task(
    cfg: DictConfig,
    model: DecoderLM,
    datamodule: TextDataModule | None = None,
    extras: dict | None = None,
) -> LanguageModelTask:
    medusa = cfg.get("medusa") or {}  # experiment=medusa's options (absent otherwise)
    token_bytes = word_counts = None
    if datamodule is not None:
        token_bytes = torch.as_tensor(datamodule.tokenizer.token_bytes)
        word_counts = datamodule.word_counts() if hasattr(datamodule, "word_counts") else None
    return LanguageModelTask(
        model,
        optimizer=instantiate(cfg.optim.optimizer, _convert_="all"),
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        max_steps=cfg.trainer.max_steps,
        min_lr=cfg.optim.min_lr,
        token_bytes=token_bytes,
        checkpoint_extras=extras,
        medusa_loss_decay=float(medusa.get("loss_decay", 0.8)),
        medusa_joint=bool(medusa.get("joint", False)),
        medusa_base_lr_scale=float(medusa.get("base_lr_scale", 0.1)),
        medusa_distill_prompt=int(medusa.get("distill_prompt", 0)),
        word_counts=word_counts,
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
    if cfg.logger.get("wandb", False):
        mode = wandb_mode(cfg.logger.get("mode", "auto"))
        loggers.append(
            WandbLogger(
                project=cfg.logger.project,
                name=cfg.logger.name,
                group=cfg.logger.get("group") or sweep_group(),  # one group per sweep
                save_dir=str(run_dir),
                offline=mode == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    *,
    loggers: list[Logger] | None = None,
    extra_callbacks: list[L.Callback] | None = None,
    **overrides,
) -> L.Trainer:
    checkpoints = run_dir / "checkpoints"
    callbacks = [
        # the best by val/loss (saved when validation runs)
        ModelCheckpoint(
            dirpath=checkpoints,
            filename="best-step{step}",
            auto_insert_metric_name=False,
            monitor="val/loss",
            mode="min",
            save_top_k=cfg.checkpoint.save_top_k,
        ),
        # last.ckpt, unconditionally: at every validation and every_n_train_steps (a monitored
        # checkpoint would wait for the first validation)
        ModelCheckpoint(
            dirpath=checkpoints,
            monitor=None,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=cfg.checkpoint.every_n_train_steps,
        ),
        TrainingProgressBar(),
        GracefulStop(run_dir / "checkpoints" / "last.ckpt"),
        DivergenceGuard(),
        *(extra_callbacks or []),
    ]
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        **overrides,
    )


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles, Sapphire Rapids on)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, accelerator: str) -> str:
    """trainer.precision=auto: bf16-mixed on GPUs with bfloat16 (16-mixed on older ones); on a
    CPU, bf16-mixed where bf16 matmuls are native (AMX), else 32-true.

    Measured on a 2-core AMX CPU (scripts/bench.py, Lightning path, alternating runs): bf16-mixed
    is 1.2x faster than 32-true for the default model (4 x 128, T=256), 2.1x at 6 x 384 and
    1.3-1.55x for the 64-token shakespeare_char_cpu recipe, which reached the same val loss either
    way (1.8955 against 1.8958 after its 2000 steps; docs/throughput.md). Without native bf16,
    autocast only adds casts around emulated matmuls.
    """
    if precision != "auto":
        return precision
    if _on_gpu(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


# glibc's malloc option numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the OS.

    A training step allocates and frees the same large activations every step. By default glibc
    serves large blocks with fresh mmap pages and trims the heap after each free, so every step
    pays page faults on the first touch of every activation: on a 2-core CPU, 8% of the
    shakespeare_char_fast step (486 against 448 ms). Serving blocks up to 32 MiB (glibc's
    largest allowed threshold) from the heap and never trimming it removes them; the process
    keeps its peak memory instead of returning it between steps. No-op off glibc (macOS,
    Windows, musl): returns whether the settings took.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def apply_runtime_settings(cfg: DictConfig) -> None:
    """Resolve trainer.precision=auto (in cfg, so checkpoints record what ran), set the fp32
    matmul precision ("high": TF32 on Ampere+ GPUs, no change on CPUs), the thread count, and
    malloc's reuse of freed memory (`keep_freed_memory`)."""
    keep_freed_memory()
    with open_dict(cfg):
        cfg.trainer.precision = resolve_precision(
            str(cfg.trainer.precision), str(cfg.trainer.accelerator)
        )
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))


def check_precision(precision: str, accelerator: str) -> None:
    """Refuse a precision the device cannot run instead of silently changing the numerics."""
    on_gpu = _on_gpu(accelerator)
    if precision in ("16-mixed", "16-true") and not on_gpu:
        raise ValueError(
            f"trainer.precision={precision} needs a CUDA GPU (fp16 autocast with loss "
            f"scaling); on CPU use bf16-mixed or 32-true"
        )
    if precision.startswith("bf16") and on_gpu and not torch.cuda.is_bf16_supported():
        raise ValueError(f"trainer.precision={precision}: this GPU has no bfloat16; use 16-mixed")


def check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"run dir {run_dir} is not writable ({err.strerror}); "
            f"set hydra.run.dir to a writable folder"
        ) from err


def peak_memory_mb() -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _baseline_enabled(cfg: DictConfig) -> bool:
    return bool(cfg.get("ngram") and cfg.ngram.get("enabled", False))


def write_layer_bench(cfg: DictConfig, path: Path) -> list[dict]:
    """Time one mixer layer (forward + backward) at each of cfg.bench_seq_lens and write the
    rows to path as {"layer": [...]}, the bench data of the sweep report's throughput plot."""
    from functools import partial

    from lmkit.bench import layer_costs

    batch_size = 1
    precision = str(cfg.trainer.precision)
    rows = layer_costs(
        partial(instantiate(cfg.model.mixer), cfg.model.d_model),
        list(cfg.bench_seq_lens),
        d_model=cfg.model.d_model,
        batch_size=batch_size,
        repeats=3,
        precision=precision if precision in ("32-true", "bf16-mixed") else "32-true",
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    rows = [{**row, "batch_size": batch_size} for row in rows]
    path.write_text(json.dumps({"layer": rows}, indent=2))
    return rows


def medusa_from_base(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """experiment=medusa: take model, tokenizer and data from cfg.base_ckpt's own config, add
    cfg.medusa.num_heads heads, and return the base weights to start from."""
    from lmkit.checkpoint import restore  # here: checkpoint imports this module

    medusa = cfg.get("medusa") or {}
    num_heads = int(medusa.get("num_heads", 4))
    if num_heads < 1:
        raise ValueError(f"medusa.num_heads={num_heads} must be >= 1")
    distill_prompt = int(medusa.get("distill_prompt", 0))
    if distill_prompt and medusa.get("joint", False):  # before any data or model work
        raise ValueError(
            "medusa.distill_prompt trains the heads on the frozen base's own greedy text; with "
            "medusa.joint=true (Medusa-2) the base would learn from itself. Add "
            "medusa.distill_prompt=0 to train both on the data"
        )
    base = restore(cfg.base_ckpt)
    block_size = int(base.config.data.block_size)
    if not 0 <= distill_prompt < block_size:
        raise ValueError(
            f"medusa.distill_prompt={distill_prompt} must be in [0, {block_size}): the base's "
            f"windows of {block_size} tokens continue the first distill_prompt of them (0: off)"
        )
    if base.config.model.get("medusa_heads"):
        raise ValueError(
            f"base_ckpt={cfg.base_ckpt} already has Medusa heads; give the plain model's checkpoint"
        )
    with open_dict(cfg):
        for section in ("model", "tokenizer", "data"):  # the base run's, so weights and ids fit
            cfg[section] = base.config[section]
        cfg.model.medusa_heads = num_heads
    log.info("Medusa: %d heads on %s (model, tokenizer and data from it)", num_heads, cfg.base_ckpt)
    return base.model.state_dict()


def load_base_weights(model: DecoderLM, state: dict[str, torch.Tensor], *, joint: bool) -> None:
    """Load the base model's weights, start the heads from its LM head and, unless joint
    (Medusa-2), freeze everything but the heads (Medusa-1)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("medusa.") for k in missing):
        raise ValueError(f"base checkpoint does not fit the model: {unexpected or missing}")
    model.medusa.init_from(model.head)
    if not joint:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("medusa."))


def train(cfg: DictConfig) -> dict:
    """Train the model of cfg, evaluate it on val (and test), write results.json; return it."""
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    base_state = medusa_from_base(cfg) if cfg.get("base_ckpt") else None
    check_run_dir(run_dir)
    check_model_config(cfg)  # fail fast on sizes and options, before any data work
    apply_runtime_settings(cfg)
    if cfg.trainer.max_steps == -1 and not cfg.trainer.get("max_time"):
        raise ValueError(
            "trainer.max_steps=-1 sets no step limit; give a time budget "
            "(trainer.max_time=00:00:15:00) or a number of steps"
        )
    check_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    # The checkpoint to continue: it exists, is lmkit's and holds the same model and data.
    ckpt_path, resumed_step = resume_checkpoint(cfg, run_dir)
    if _baseline_enabled(cfg):
        check_baseline_config(cfg.ngram.order, cfg.ngram.discount)  # not after a long run
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loggers = build_loggers(cfg, run_dir, resumed_step=resumed_step)
    trainer = build_trainer(cfg, run_dir, loggers=loggers)
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    model = build_model(cfg, datamodule.vocab_size)
    if base_state is not None:
        joint = bool((cfg.get("medusa") or {}).get("joint", False))
        load_base_weights(model, base_state, joint=joint)
    if cfg.model.get("compile"):
        compile_model(model)
    extras = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "tokenizer": datamodule.tokenizer.to_json(),
    }
    task = build_task(cfg, model, datamodule, extras)
    log.info(
        "model: %s parameters (%s non-embedding)",
        f"{model.num_params():,}",
        f"{model.num_params(non_embedding=True):,}",
    )

    # weights_only: a resumed checkpoint is read without unpickling code.
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    stopper = next(c for c in trainer.callbacks if isinstance(c, GracefulStop))
    if stopper.stopped_at is not None:  # SIGTERM/SIGINT: checkpointed, no final evaluation
        log.warning(
            "stopped at step %d; continue with resume=true hydra.run.dir=%s",
            stopper.stopped_at,
            run_dir,
        )
        return {"interrupted_at_step": stopper.stopped_at, "checkpoint": str(last)}
    # The final weights and full training state, whatever the validation schedule was.
    trainer.save_checkpoint(last, weights_only=False)

    results: dict = {}
    eval_started = time.perf_counter()
    for split, run in (("val", trainer.validate), ("test", trainer.test)):
        if split not in datamodule.split_names:
            continue
        if split == "val" and task.last_val and task.last_val["step"] == trainer.global_step:
            # fit validated these very weights at its last step: no second pass over val
            metrics = {f"val/{k}": v for k, v in task.last_val.items() if k != "step"}
        else:
            metrics = run(task, datamodule=datamodule, verbose=False)[0]
        results.update(
            {f"{split}_{k}": metrics[f"{split}/{k}"] for k in ("loss", "ppl", "bpb", "acc")}
        )
        if f"{split}/word_ppl" in metrics:  # the whole split was scored
            results[f"{split}_word_ppl"] = metrics[f"{split}/word_ppl"]
        results.update(  # each Medusa head's top-1 accuracy
            {
                f"{split}_{k.split('/', 1)[1]}": v
                for k, v in metrics.items()
                if k.startswith(f"{split}/medusa")
            }
        )
    final_eval_s = time.perf_counter() - eval_started
    if trainer.world_size > 1 and "val_loss" in results:  # every rank must agree (DDP)
        per_rank = trainer.strategy.all_gather(torch.tensor(results["val_loss"]))
        results["val_loss_per_rank"] = per_rank.flatten().tolist()
    steady = task.step_times[min(10, len(task.step_times) // 2) :] or task.step_times
    tokens_per_step = cfg.data.batch_size * cfg.data.block_size * trainer.world_size
    results.update(
        {
            "params": model.num_params(),
            "tokens_per_s": tokens_per_step / statistics.median(steady) if steady else None,
            "wall_s": time.perf_counter() - started,
            "fit_val_s": task.fit_val_seconds,  # validations during training (inside wall_s)
            "final_eval_s": final_eval_s,  # the final val/test evaluation (inside wall_s)
            "peak_mem_mb": peak_memory_mb(),
            "steps": trainer.global_step,  # optimizer steps taken (a time budget decides them)
            "checkpoint": str(last),
            "config": extras["config"],
        }
    )
    if trainer.is_global_zero and cfg.get("bench_seq_lens"):
        write_layer_bench(cfg, run_dir / "bench.json")
    if trainer.is_global_zero and _baseline_enabled(cfg) and not datamodule.ngram_baseline:
        log.info("n-gram baseline: not applicable to %s", type(datamodule).__name__)
    elif trainer.is_global_zero and _baseline_enabled(cfg):
        # after wall_s: the baseline is cached per data, tokenizer and order across runs
        baseline = baseline_metrics(datamodule, cfg.ngram.order, cfg.ngram.discount)
        splits = [s for s in ("val", "test") if s in baseline]
        log.info(
            "n-gram baseline (KN%d): %s",
            baseline["order"],
            ", ".join(f"{s} ppl {baseline[s]['ppl']:.2f}" for s in splits),
        )
        results["baseline"] = baseline
        if cfg.ngram.get("word_level") and cfg.tokenizer.get("kind", "char") != "word":
            try:
                results["word_baseline"] = word_level_baseline(cfg)
            except (OSError, ValueError) as error:  # the trained run's results still get written
                log.warning("word-level n-gram baseline skipped: %s", error)
        results["config"] = results.pop("config")  # the config stays last
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # the next job of a multirun starts its own wandb run
    return results
