"""lmkit checkpoints: safe loading, restoring model and tokenizer, resume and init_from checks,
atomic writes, export, and the upgrade of checkpoints written by earlier layouts."""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_model
from torch import nn

from lmkit.data.tokenizers import Tokenizer
from lmkit.files import atomic_write
from lmkit.medusa.legacy import upgrade_legacy_medusa
from lmkit.run.build import build_model, build_task

log = logging.getLogger(__name__)

# What may differ between the attempts of one run without changing what it computes: where it
# logs and how it shows progress, how often it checkpoints, how it executes, what it measures
# after training. Everything else must match unless the user names it in resume_accept.
RESUME_MAY_DIFFER = (
    "resume",
    "resume_accept",
    "ckpt_path",
    "run_dir",
    "logger.",
    "checkpoint.",
    "runtime.",
    "callbacks.",
    "ngram.",
    "data.num_workers",
    "data.eval_batch_size",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.limit_test_batches",
)
# The budget may change between attempts (extending a run), with a warning: the cosine schedule
# then decays over the new budget, so the learning rate jumps at the resume point.
RESUME_BUDGET = ("trainer.max_steps", "trainer.max_time")
# The sections init_from takes from its checkpoint, so that weights and token ids fit.
INIT_FROM_SECTIONS = ("model", "tokenizer", "data")
# An exported model folder (scripts/export.py): what restore reads back.
FOLDER_FORMAT = "lmkit"
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE = (
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "README.md",
)
# config.json's keys beside the run config's sections.
FOLDER_METADATA = ("format", "lmkit_version", "vocab_size", "global_step", "tokens_seen")


@dataclass
class Restored:
    """What a checkpoint holds: the trained model (eval mode), its tokenizer and its config."""

    model: nn.Module
    tokenizer: Tokenizer
    config: DictConfig
    global_step: int


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (no pickled code runs), upgraded to the current layout;
    one clear error per failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass ckpt=<run_dir>/checkpoints/"
            f"last.ckpt of a finished run"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"checkpoint {path} is corrupt or not a torch checkpoint ({err}); "
            f"use another checkpoint of the run"
        ) from err
    if (
        not isinstance(checkpoint, dict)
        or "lmkit" not in checkpoint
        or "state_dict" not in checkpoint
    ):
        raise ValueError(
            f"checkpoint {path} was not written by lmkit (no config or tokenizer "
            f"inside); pass a checkpoint saved by scripts/train.py"
        )
    return upgrade(checkpoint)


def upgrade(checkpoint: dict) -> dict:
    """A checkpoint written before the `task` and `runtime` sections existed, in today's layout:
    the execution options move to `runtime`, the task section is the one the run used."""
    config = checkpoint["lmkit"]["config"]
    if "task" in config:
        return checkpoint
    model = config["model"]
    config["runtime"] = {
        "compile": bool(model.pop("compile", False)),
        "threads": config.pop("threads", None),
        "float32_matmul_precision": config.pop("float32_matmul_precision", None) or "highest",
    }
    config.pop("bench_seq_lens", None)
    data = config["data"]
    data.setdefault("seed", "${seed}")
    data.setdefault("max_steps", "${trainer.max_steps}")
    if not data["_target_"].endswith("MQARDataModule"):  # MQAR's tokens are its own ids
        data.setdefault("tokenizer", "${tokenizer}")
    config["init_from"] = config.pop("base_ckpt", None)
    config["callbacks"] = {}
    config["task"] = {
        "_target_": "lmkit.task.LanguageModelTask",
        "_partial_": True,
        "optimizer": "${optim.optimizer}",
        "weight_decay": "${optim.weight_decay}",
        "warmup_steps": "${optim.warmup_steps}",
        "min_lr": "${optim.min_lr}",
        "max_steps": "${trainer.max_steps}",
    }
    upgrade_legacy_medusa(checkpoint)
    return checkpoint


def model_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The task's model weights of a checkpoint, without the task's `model.` prefix."""
    prefix = "model."
    return {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }


def restore(path: str | Path) -> Restored:
    """Rebuild the model of a checkpoint, or of a folder written by scripts/export.py, from its
    own config (through its task, which may wrap the model in modules of its own) and load its
    weights."""
    if Path(path).is_dir():
        return restore_folder(path)
    checkpoint = load_checkpoint(path)
    extras = checkpoint["lmkit"]
    config = OmegaConf.create(extras["config"])
    tokenizer = Tokenizer.from_json(extras["tokenizer"])
    model = _empty_model(config, tokenizer)
    model.load_state_dict(model_state(checkpoint))
    return Restored(model.eval(), tokenizer, config, int(checkpoint.get("global_step", 0)))


def restore_folder(folder: str | Path) -> Restored:
    """The model of an exported folder: config.json's run config, tokenizer.json, and the
    weights of model.safetensors (tied weights stored once, shared again on load)."""
    folder = Path(folder)
    config_file = folder / CONFIG_FILE
    spec = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if spec.get("format") != FOLDER_FORMAT:
        raise ValueError(
            f"{folder} is not a model folder written by lmkit (its {CONFIG_FILE} is missing or "
            f"has no format={FOLDER_FORMAT!r}); export one with scripts/export.py ckpt=... out=DIR"
        )
    metadata = {k: spec.pop(k, None) for k in FOLDER_METADATA}
    config = OmegaConf.create(spec)
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
    if tokenizer.vocab_size != metadata["vocab_size"]:
        raise ValueError(
            f"{folder / TOKENIZER_FILE} has {tokenizer.vocab_size} tokens but {CONFIG_FILE} says "
            f"vocab_size={metadata['vocab_size']}; export the folder again"
        )
    model = _empty_model(config, tokenizer)
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    return Restored(model.eval(), tokenizer, config, int(metadata["global_step"] or 0))


def _empty_model(config: DictConfig, tokenizer: Tokenizer) -> nn.Module:
    """The model of a config, as its task builds it (e.g. with Medusa heads), before loading."""
    return build_task(config, build_model(config, tokenizer.vocab_size)).model


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through lmkit.files.atomic_write: a kill during a save leaves the
    previous checkpoint intact, never a torn one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def check_run_dir(run_dir: Path) -> None:
    """The run dir exists and is writable, before any long work."""
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


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[str | None, int]:
    """The checkpoint this run continues (ckpt_path, or last.ckpt of run_dir when resume=true)
    and its global step, checked to exist, to be lmkit's and to hold the same model, tokenizer
    and data; (None, 0) for a fresh run. A fresh run refuses a run dir that already holds
    checkpoints, so that none is ever overwritten."""
    last = run_dir / "checkpoints" / "last.ckpt"
    path = cfg.ckpt_path
    if cfg.resume and path is None:
        if not last.is_file():
            raise FileNotFoundError(
                f"resume=true but {last} does not exist; point hydra.run.dir "
                f"at the run dir to continue (or pass ckpt_path=...)"
            )
        path = str(last)
    if path is None:
        if last.is_file():
            raise FileExistsError(
                f"run dir {run_dir} already holds {last}; continue it with "
                f"resume=true or start a new run in another hydra.run.dir"
            )
        return None, 0
    checkpoint = load_checkpoint(path)
    step = int(checkpoint.get("global_step", 0))
    check_same_run(OmegaConf.create(checkpoint["lmkit"]["config"]), cfg, path, step)
    return str(path), step


def check_same_run(saved: DictConfig, cfg: DictConfig, path, step: int) -> list[str]:
    """The whole config equals the checkpoint's, but for RESUME_MAY_DIFFER, the budget (with a
    warning) and the keys of cfg.resume_accept; else one error naming up to three keys.
    Returns the keys that differ and were let through."""
    old, new = _flat(saved), _flat(cfg)
    derived = _interpolated(cfg)  # compared through the keys they copy (optim.*, seed, ...)
    accepted = tuple(str(k) for k in cfg.resume_accept)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    diff = [k for k in changed if not k.startswith(RESUME_MAY_DIFFER + accepted + derived)]
    budget = [k for k in diff if k in RESUME_BUDGET]
    diff = [k for k in diff if k not in RESUME_BUDGET]
    if diff:
        pairs = "; ".join(
            f"{k}: {old.get(k)!r} in the checkpoint vs {new.get(k)!r} now" for k in diff[:3]
        )
        raise ValueError(
            f"checkpoint {path} was trained with other settings ({pairs}); resume with the "
            f"checkpoint's settings, or continue with these on purpose: "
            f"resume_accept=[{','.join(diff)}]"
        )
    if cfg.trainer.max_steps != -1 and cfg.trainer.max_steps <= step:
        raise ValueError(
            f"checkpoint {path} is at step {step}, and trainer.max_steps={cfg.trainer.max_steps} "
            f"leaves nothing to train; raise trainer.max_steps to continue the run"
        )
    for key in budget:
        log.warning(
            "resuming with %s=%s (the checkpoint's run had %s): the cosine schedule now decays "
            "over the new budget, so the learning rate at step %d differs from the first attempt's",
            key,
            new.get(key),
            old.get(key),
            step,
        )
    return [k for k in changed if not k.startswith(derived)]


def _interpolated(cfg: DictConfig) -> tuple[str, ...]:
    """The keys (prefixes) whose values interpolate other keys of cfg (e.g. task.optimizer,
    data.seed): differences there are differences of the keys they copy."""
    leaves = _leaves(OmegaConf.to_container(cfg, resolve=False))
    return tuple(k for k, v in leaves.items() if isinstance(v, str) and v.startswith("${"))


def _flat(section) -> dict:
    return {} if section is None else _leaves(OmegaConf.to_container(section, resolve=True))


def _leaves(container, prefix: str = "") -> dict:
    """{"a.b.c": value} for every non-dict value of a nested dict."""
    if not isinstance(container, dict):
        return {prefix[:-1]: container}
    out: dict = {}
    for key, value in container.items():
        out.update(_leaves(value, f"{prefix}{key}."))
    return out


def adopt_init_from(cfg: DictConfig) -> dict[str, torch.Tensor]:
    """init_from=<checkpoint>: a new run that starts from that checkpoint's model weights. Its
    model, tokenizer and data sections replace cfg's (so weights and token ids fit); the
    weights are checked to fit that model before any data work and returned."""
    path = cfg.init_from
    checkpoint = load_checkpoint(path)
    saved = OmegaConf.create(checkpoint["lmkit"]["config"])
    state = model_state(checkpoint)
    vocab_size = Tokenizer.from_json(checkpoint["lmkit"]["tokenizer"]).vocab_size
    with torch.device("meta"):
        expected = set(build_model(saved, vocab_size).state_dict())
    if set(state) != expected:
        raise ValueError(
            f"init_from={path}: its weights are not a plain {saved.model._target_} (task "
            f"{saved.task._target_} adds {sorted(set(state) - expected)[:2]}...); give the "
            f"checkpoint of a model trained with task=lm"
        )
    with open_dict(cfg):
        for section in INIT_FROM_SECTIONS:
            cfg[section] = adopted_section(saved[section], cfg[section])
    return state


def adopted_section(saved: DictConfig, current: DictConfig) -> dict:
    """The checkpoint's section, but for the keys that copy run-wide settings (data.seed and
    data.max_steps interpolate seed and trainer.max_steps): those stay this run's."""
    section = OmegaConf.to_container(saved, resolve=True)
    for key, value in OmegaConf.to_container(current, resolve=False).items():
        if key in section and isinstance(value, str) and value.startswith("${"):
            section[key] = value
    return section
