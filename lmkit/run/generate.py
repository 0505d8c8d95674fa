"""Text from a checkpoint: cached sampling with every mixer, or Medusa decoding (greedy, or
sampled under typical acceptance)."""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig

from lmkit.decoding.sampling import generate
from lmkit.medusa.accept import ACCEPTANCE
from lmkit.medusa.decode import medusa_generate
from lmkit.medusa.tree import calibrate_tree, calibration_text, calibration_windows
from lmkit.run.build import build_datamodule
from lmkit.run.checkpoint import Restored, restore


def generate_texts(cfg: DictConfig) -> list[str]:
    """cfg.num_samples continuations of cfg.prompt by the model of cfg.ckpt."""
    if cfg.decoding == "medusa":
        check_medusa_options(cfg)  # before any loading
    restored = restore(cfg.ckpt)
    ids = restored.tokenizer.encode(str(cfg.prompt))
    if not ids:
        raise ValueError("prompt encodes to no tokens; give a non-empty prompt")
    prompt = torch.tensor([ids] * cfg.num_samples, dtype=torch.long)
    if cfg.decoding == "medusa":
        return medusa_texts(cfg, restored, prompt)
    if cfg.decoding != "sample":
        raise ValueError(f"decoding={cfg.decoding!r}; choose sample or medusa")
    out = generate(
        restored.model,
        prompt,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return [restored.tokenizer.decode(row.tolist()) for row in out]


def check_medusa_options(cfg: DictConfig) -> None:
    """decoding=medusa honours temperature, top_k, top_p, seed and num_samples only under typical
    acceptance, which samples; greedy acceptance is greedy decoding (temperature=0, where
    top_k, top_p and seed do nothing, as with decoding=sample)."""
    acceptance = cfg.medusa.acceptance
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"medusa.acceptance={acceptance!r}; choose one of {list(ACCEPTANCE)}")
    if acceptance == "typical" and cfg.temperature <= 0:
        raise ValueError(
            f"temperature={cfg.temperature} with medusa.acceptance=typical, which samples: set "
            f"temperature>0 (e.g. temperature=0.8), or medusa.acceptance=greedy to decode greedily"
        )
    if acceptance == "greedy" and cfg.temperature > 0:
        raise ValueError(
            f"temperature={cfg.temperature} with medusa.acceptance=greedy, which decodes greedily: "
            f"add temperature=0, or medusa.acceptance=typical to sample"
        )
    if acceptance == "greedy" and cfg.num_samples > 1:
        raise ValueError(
            f"num_samples={cfg.num_samples} with medusa.acceptance=greedy would print the same "
            f"text {cfg.num_samples} times: use num_samples=1, or medusa.acceptance=typical"
        )


def medusa_sampling(cfg: DictConfig) -> dict:
    """medusa_generate's sampling options: under typical acceptance the root and bonus tokens are
    drawn at cfg.temperature after top_k / top_p, from one generator seeded with cfg.seed (the
    samples follow one another: the same seed gives the same texts)."""
    if cfg.medusa.acceptance != "typical":
        return {}
    return dict(
        temperature=cfg.temperature,
        sample=True,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def medusa_texts(cfg: DictConfig, restored: Restored, prompt: torch.Tensor) -> list[str]:
    """Medusa decoding of each prompt row with a tree fitted to the heads' hit rates on the
    checkpoint's val text (greedy acceptance: on the model's greedy continuations of it)."""
    options = cfg.medusa
    datamodule = build_datamodule(restored.config)
    datamodule.prepare()
    windows = calibration_windows(datamodule, 16)
    calibration = calibration_text(restored.model, windows, options.acceptance)
    tree = calibrate_tree(restored.model, calibration, options.tree_nodes)
    sampling = medusa_sampling(cfg)
    texts = []
    for row in prompt:
        tokens, stats = medusa_generate(
            restored.model,
            row.unsqueeze(0),
            cfg.max_new_tokens,
            tree=tree,
            acceptance=options.acceptance,
            epsilon=options.epsilon,
            delta=options.delta,
            **sampling,
        )
        texts.append(restored.tokenizer.decode(tokens[0].tolist()))
        print(  # stderr: stdout holds the texts alone
            f"medusa: {stats.tokens_per_step:.2f} tokens/step over {stats.steps} steps, "
            f"{stats.tokens_per_s:,.0f} tokens/s ({len(tree)}-node tree, {options.acceptance})",
            file=sys.stderr,
        )
    return texts
