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

import torch
from rich.console import Console
from rich.table import Table

from lmkit.checkpoint import restore
from lmkit.cli import parse_key_values, run_cli
from lmkit.decoding.medusa import (
    calibrate_tree,
    calibration_text,
    calibration_windows,
    speedup_report,
    timed_greedy,
)
from lmkit.training import build_datamodule

DEFAULTS = {
    "ckpt": "???",
    "prompts": 20,
    "prompt_len": 8,
    "max_new_tokens": 48,
    "tree_nodes": 8,  # fastest on this CPU, where every verified node costs compute
    "acceptance": "greedy",
    "threads": None,
}


def bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(int(args.threads))
    restored = restore(args.ckpt)
    model = restored.model
    if model.medusa is None:
        raise ValueError(f"{args.ckpt} has no Medusa heads; train them with experiment=medusa")
    datamodule = build_datamodule(restored.config)
    datamodule.prepare()
    windows = calibration_windows(datamodule, args.prompts + 32)  # prompts, then the fit
    calibration = calibration_text(model, windows[args.prompts :], args.acceptance, args.prompt_len)
    tree = calibrate_tree(model, calibration, args.tree_nodes)
    prompts = [windows[i : i + 1, : args.prompt_len] for i in range(args.prompts)]
    timed_greedy(model, prompts[0], 4)  # warm-up
    report = speedup_report(
        model, prompts, args.max_new_tokens, tree=tree, acceptance=args.acceptance
    )
    mixer = restored.config.model.mixer._target_.rsplit(".", 1)[-1]
    report.update({"mixer": mixer, "tree_nodes": len(tree), "acceptance": args.acceptance})
    return report


def main() -> None:
    args = parse_key_values(DEFAULTS, __doc__)
    report = run_cli(bench, args)
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
