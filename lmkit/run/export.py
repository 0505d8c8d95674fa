"""A checkpoint as a model folder: model.safetensors, config.json, tokenizer.json and a README.md
model card; restore() (lmkit.run.checkpoint) loads it back, transformers loads its tokenizer, and
huggingface_hub can push it to the Hub."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi
from omegaconf import OmegaConf
from safetensors.torch import save_model

from lmkit.run.checkpoint import (
    CARD_FILE,
    CONFIG_FILE,
    FOLDER_FORMAT,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Restored,
    restore,
)
from lmkit.run.model_card import model_card

log = logging.getLogger(__name__)
FOLDER_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE)


def export_folder(
    ckpt: str | Path,
    out: str | Path,
    *,
    push: bool = False,
    repo_id: str | None = None,
    private: bool = True,
) -> Path:
    """Write the model folder of a checkpoint to `out` (a new or empty folder, or one this
    function wrote before); with push=True, upload it to the Hub repo `repo_id`."""
    out = Path(out)
    check_export_options(ckpt, out, push, repo_id)
    restored = restore(ckpt)
    results = run_results(Path(ckpt), restored.global_step)
    _write_atomically(out, lambda tmp: write_folder(restored, tmp, results))
    if push:
        push_folder(out, repo_id, private=private)
    return out


def check_export_options(ckpt, out: Path, push: bool, repo_id: str | None) -> None:
    """Every option usable, before the checkpoint is read; an existing folder is never
    overwritten unless it holds only an earlier export's files."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(
            f"ckpt={ckpt} is not a checkpoint file; pass <run_dir>/checkpoints/last.ckpt"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file; give a folder to write the model into")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES)
        if foreign:
            raise FileExistsError(
                f"out={out} holds files an export did not write ({', '.join(foreign[:3])}); "
                "give a new or empty folder"
            )
    if push and not repo_id:
        raise ValueError("push=true needs repo_id=<user or org>/<name> (the Hub repo to create)")


def run_results(ckpt: Path, step: int) -> dict | None:
    """The run's results.json when it describes this checkpoint (the run's final weights)."""
    results_file = ckpt.resolve().parent.parent / "results.json"
    if not results_file.is_file():
        return None
    results = json.loads(results_file.read_text())
    same = results.get("steps") == step and Path(results.get("checkpoint", "")).resolve() == (
        ckpt.resolve()
    )
    return results if same else None


def write_folder(restored: Restored, folder: Path, results: dict | None) -> None:
    """The four files of a model folder."""
    config = OmegaConf.to_container(restored.config, resolve=True)
    spec = {
        "format": FOLDER_FORMAT,
        "lmkit_version": importlib.metadata.version("lmkit"),
        "vocab_size": restored.tokenizer.vocab_size,
        "global_step": restored.global_step,
        "tokens_seen": (results or {}).get("tokens"),
        **config,
    }
    save_model(restored.model, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    restored.tokenizer.save(folder / TOKENIZER_FILE)
    (folder / CARD_FILE).write_text(model_card(restored, results), encoding="utf-8")


def _write_atomically(out: Path, write) -> None:
    """Write into a temporary folder beside `out`, then put it in place: a failed export
    leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        _permissions_as_umask(tmp)
        if out.is_dir():
            shutil.rmtree(out)  # only an earlier export's files (check_export_options)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _permissions_as_umask(folder: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp makes the folder private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def push_folder(folder: Path, repo_id: str, *, private: bool = True) -> str:
    """Upload a model folder to the Hub repo `repo_id` (created when missing); the URL."""
    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True, private=private)
        url = str(api.upload_folder(folder_path=str(folder), repo_id=repo_id).commit_url)
    except Exception as err:  # offline, no token, no rights: the same advice
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConnectionError(
            f"pushing {folder} to the Hub repo {repo_id} failed ({type(err).__name__}: "
            f"{reason}); the folder is written: log in (hf auth login) and push it when online "
            f"with `hf upload {repo_id} {folder}`"
        ) from err
    log.info("pushed %s to %s", folder, url)
    return url
