"""Reading lmkit checkpoints: safe loading (weights_only) and rebuilding model and tokenizer."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from lmkit.data.tokenizers import Tokenizer
from lmkit.model.decoder import DecoderLM


@dataclass
class Restored:
    """What a checkpoint holds: the trained model (eval mode), its tokenizer and its config."""

    model: DecoderLM
    tokenizer: Tokenizer
    config: DictConfig
    global_step: int


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (no pickled code runs); one clear error per failure."""
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
    return checkpoint


def restore(path: str | Path) -> Restored:
    """Rebuild the model of a checkpoint from its own config and load its weights."""
    from lmkit.training import build_model  # here to keep the import graph acyclic

    checkpoint = load_checkpoint(path)
    extras = checkpoint["lmkit"]
    config = OmegaConf.create(extras["config"])
    tokenizer = Tokenizer.from_json(extras["tokenizer"])
    model = build_model(config, tokenizer.vocab_size)
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model.load_state_dict(state)
    model.eval()
    return Restored(model, tokenizer, config, int(checkpoint.get("global_step", 0)))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file beside its target, fsyncs it, then renames it over
    the target: a kill during a save leaves the previous checkpoint intact, never a torn one."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX within one filesystem
        finally:
            tmp.unlink(missing_ok=True)


# Sections of the config that must match for a checkpoint to continue a run.
RESUME_MUST_MATCH = ("model", "tokenizer", "data")
# ... except how they run: these may change between attempts.
RESUME_MAY_DIFFER = ("eval_batch_size", "num_workers", "compile")


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[str | None, int]:
    """The checkpoint this run continues (ckpt_path, or last.ckpt of run_dir when resume=true)
    and its global step, checked to exist, to be lmkit's and to hold the same model, tokenizer
    and data; (None, 0) for a fresh run. A fresh run refuses a run dir that already holds
    checkpoints, so that none is ever overwritten."""
    last = run_dir / "checkpoints" / "last.ckpt"
    path = cfg.get("ckpt_path")
    if cfg.get("resume") and path is None:
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
    saved = OmegaConf.create(checkpoint["lmkit"]["config"])
    for section in RESUME_MUST_MATCH:
        old, new = _flat(saved.get(section)), _flat(cfg.get(section))
        diff = sorted(
            k
            for k in old.keys() | new.keys()
            if old.get(k) != new.get(k) and not k.endswith(RESUME_MAY_DIFFER)
        )
        if diff:
            pairs = ", ".join(
                f"{section}.{k}: {old.get(k)!r} in the checkpoint vs {new.get(k)!r} now"
                for k in diff[:3]
            )
            raise ValueError(
                f"checkpoint {path} belongs to a different run ({pairs}); resume "
                f"with the checkpoint's config or start a new run"
            )
    return str(path), int(checkpoint.get("global_step", 0))


def _flat(section) -> dict:
    if section is None:
        return {}
    container = OmegaConf.to_container(section, resolve=True)
    out: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value

    walk("", container)
    return out


def export_safetensors(ckpt: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's model weights as safetensors (tied weights stored once), with the
    config and tokenizer as metadata."""
    from safetensors.torch import save_model

    restored = restore(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "config": OmegaConf.to_yaml(restored.config),
        "tokenizer": restored.tokenizer.to_json(),
        "format": "lmkit",
    }
    save_model(restored.model, str(out), metadata=metadata)
    return out
