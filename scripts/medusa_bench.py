"""Medusa against plain cached greedy decoding on the same prompts (figures, not assertions).

  python scripts/medusa_bench.py ckpt=outputs/<medusa run>/checkpoints/last.ckpt
      [prompts=20] [prompt_len=8] [max_new_tokens=48] [tree_nodes=8] [acceptance=greedy]
      [threads=null]

Prompts are the first prompt_len tokens of val windows; the tree is fitted to the heads' hit
rates on 32 other val windows (with greedy acceptance: on the model's greedy continuations of
their first prompt_len tokens, the text greedy decoding produces). Prints tokens per step (mean
accepted length), tokens/s of both decoders at batch 1, the speedup and how many outputs equal
greedy decoding token for token.
"""

import json

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.medusa.decode import speedup_report, timed_greedy
from lmkit.medusa.tree import calibrate_tree, calibration_text, calibration_windows
from lmkit.run.build import build_datamodule
from lmkit.run.checkpoint import restore
from lmkit.run.cli import run_cli


def bench(cfg: DictConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    restored = restore(cfg.ckpt)
    model = restored.model
    if getattr(model, "heads", None) is None:
        raise ValueError(f"{cfg.ckpt} has no Medusa heads; train them with experiment=medusa")
    datamodule = build_datamodule(restored.config)
    datamodule.prepare()
    windows = calibration_windows(datamodule, cfg.prompts + 32)  # prompts, then the fit
    calibration = calibration_text(model, windows[cfg.prompts :], cfg.acceptance, cfg.prompt_len)
    tree = calibrate_tree(model, calibration, cfg.tree_nodes)
    prompts = [windows[i : i + 1, : cfg.prompt_len] for i in range(cfg.prompts)]
    timed_greedy(model, prompts[0], 4)  # warm-up
    options = {"tree": tree, "acceptance": cfg.acceptance}
    report = speedup_report(model, prompts, cfg.max_new_tokens, **options)
    mixer = restored.config.model.mixer._target_.rsplit(".", 1)[-1]
    return {**report, "mixer": mixer, "tree_nodes": len(tree), "acceptance": cfg.acceptance}


@hydra.main(config_path="../conf", config_name="medusa_bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = run_cli(bench, cfg)
    table = Table(
        title=f"Medusa vs greedy, batch 1: {report['mixer']}, {report['tree_nodes']} nodes"
    )
    for key in ("tokens_per_step", "medusa_tokens_per_s", "greedy_tokens_per_s", "speedup"):
        table.add_row(key, f"{report[key]:.2f}")
    table.add_row("identical to greedy", report["identical_outputs"])
    Console().print(table)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
