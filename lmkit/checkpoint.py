"""Reading lmkit checkpoints: safe loading (weights_only) and rebuilding model and tokenizer."""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
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
