"""Whole-run wall time of lmkit against nanoGPT's CPU recipe, and where a short run's time goes.

  python scripts/bench_startup.py          # lmkit alone: its wall times and a 1-step run by phase
  python scripts/bench_startup.py nanogpt=/tmp/scratch/nanoGPT steps=[1,300,2000] rounds=2

nanoGPT is not a dependency: clone karpathy/nanoGPT into a scratch folder and name it. Its Tiny
Shakespeare data is prepared there from the copy under LMKIT_DATA_DIR (data/shakespeare_char/,
written once). Both train the same model (4 layers, 4 heads, d_model 128, T=64, batch 12, fp32,
2 threads) for N steps, each at its own recipe: nanoGPT's README command for CPUs (an estimate of
the loss on 20 batches every 250 steps) and `experiment=shakespeare_char_cpu` (the whole val
split every 250 steps and at the end). The runs alternate (lmkit, nanoGPT, lmkit, ...) and each
is timed from the command's start to its exit. lmkit's 1-step runs also print their phases
(results.json "phase_s").
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.data.corpora import data_root
from lmkit.run.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
NANOGPT_CPU_RECIPE = [  # nanoGPT's README, "I only have a macbook" (CPU) command
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
    "--n_embd=128", "--dropout=0.0",
]


def lmkit_command(steps: int, out: Path, overrides: list[str]) -> tuple[list[str], Path]:
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "experiment=shakespeare_char_cpu",
           f"trainer.max_steps={steps}", f"hydra.run.dir={out}", *overrides]
    return cmd, REPO


def nanogpt_command(folder: Path, steps: int, out: Path) -> tuple[list[str], Path]:
    cmd = [sys.executable, "train.py", *NANOGPT_CPU_RECIPE, f"--max_iters={steps}",
           f"--lr_decay_iters={steps}", f"--out_dir={out}"]
    return cmd, folder


def prepare_nanogpt(folder: Path) -> None:
    """nanoGPT's train.bin / val.bin from LMKIT_DATA_DIR's Tiny Shakespeare (no download)."""
    data = folder / "data" / "shakespeare_char"
    if not (folder / "train.py").is_file():
        raise FileNotFoundError(f"nanogpt={folder} holds no train.py; clone karpathy/nanoGPT there")
    if (data / "train.bin").is_file():
        return
    shutil.copyfile(data_root() / "tinyshakespeare" / "input.txt", data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def bench(cfg: DictConfig) -> None:
    folder = Path(cfg.nanogpt).expanduser().resolve() if cfg.nanogpt else None
    if folder is not None:
        prepare_nanogpt(folder)
    walls: dict[tuple[str, int], list[float]] = {}
    phases: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lmkit-bench-startup-") as tmp:
        for r in range(cfg.rounds):
            for steps in cfg.steps:
                runs = {"lmkit": lmkit_command(steps, Path(tmp) / f"l{steps}_{r}",
                                               list(cfg.lmkit_overrides))}
                if folder is not None:
                    runs["nanoGPT"] = nanogpt_command(folder, steps, Path(tmp) / f"n{steps}_{r}")
                for name, (cmd, cwd) in runs.items():
                    walls.setdefault((name, steps), []).append(timed(cmd, cwd))
                if steps == 1:
                    results = json.loads((Path(tmp) / f"l1_{r}" / "results.json").read_text())
                    phases.append(results["phase_s"])
    print_walls(walls, cfg.steps)
    if phases:
        print_phases(phases)


def print_walls(walls: dict, steps: list[int]) -> None:
    table = Table(title="whole-run wall time, s (median of the rounds; each round's in brackets)")
    for col in ("steps", "lmkit", "nanoGPT", "lmkit / nanoGPT"):
        table.add_column(col, justify="right")
    for n in steps:
        lm, nano = walls[("lmkit", n)], walls.get(("nanoGPT", n))
        ratio = f"{statistics.median(lm) / statistics.median(nano):.2f}" if nano else "-"
        table.add_row(str(n), _cell(lm), _cell(nano) if nano else "-", ratio)
    Console().print(table)


def print_phases(phases: list[dict]) -> None:
    table = Table(title="lmkit, a 1-step run by phase, s (median of the rounds)")
    table.add_column("phase")
    table.add_column("s", justify="right")
    for name in phases[0]:
        table.add_row(name, f"{statistics.median(p[name] for p in phases):.2f}")
    total = statistics.median(sum(p.values()) for p in phases)
    table.add_row("total (from the first import)", f"{total:.2f}")
    Console().print(table)


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{', '.join(f'{v:.1f}' for v in values)}]"


@hydra.main(config_path="../conf", config_name="bench_startup", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(bench, cfg)


if __name__ == "__main__":
    main()
