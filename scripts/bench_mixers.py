"""Training throughput and MFU of every mixer at one config, in one table.

  python scripts/bench_mixers.py model.d_model=384 model.num_layers=6 model.num_heads=6 \\
      data.block_size=256 data.batch_size=8 bench.bare=true
  python scripts/bench_mixers.py mixers=[softmax,linear] out=docs/mixers.md bench.steps=40

Each mixer preset in conf/model/mixer runs `scripts/bench.py bench.what=[train]` in its own
process (peak memory is a per-process figure), one after the other; every other override
(bench.bare=true, bench.steps=N, model.d_model=..., ...) goes to each run. mixers=[a,b] picks
some; out=FILE.md also writes the table as markdown, with the figures as JSON beside it
(conf/bench_mixers.yaml).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console

from lmkit.run.bench_report import print_mixers, write_mixers
from lmkit.run.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
OWN_KEYS = ("mixers", "out")  # this script's options: not forwarded to bench.py


def mixer_presets() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "model" / "mixer").glob("*.yaml"))


def forwarded_overrides() -> list[str]:
    """The user's command-line overrides, less this script's own keys."""
    overrides = HydraConfig.get().overrides.task
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in OWN_KEYS]


def bench_one(mixer: str, args: list[str], folder: Path) -> dict:
    out = folder / f"{mixer}.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), f"model/mixer={mixer}"]
    cmd += ["bench.what=[train]", f"bench.save={out}", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: bench of mixer {mixer} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["train"]


def bench_mixers(cfg: DictConfig) -> None:
    presets = mixer_presets()
    chosen = cfg.mixers  # a list, or one name
    mixers = presets if chosen is None else [chosen] if isinstance(chosen, str) else list(chosen)
    unknown = sorted(set(mixers) - set(presets))
    if unknown:
        raise ValueError(f"unknown mixers {unknown}; choose from {presets}")
    args = forwarded_overrides()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for mixer in mixers:
            print(f"benchmarking {mixer} ...", file=sys.stderr, flush=True)
            figures[mixer] = bench_one(mixer, args, Path(folder))
    print_mixers(Console(), figures)
    if cfg.out:
        write_mixers(Path(cfg.out), figures)
        print(f"written: {cfg.out}", file=sys.stderr)


@hydra.main(config_path="../conf", config_name="bench_mixers", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(bench_mixers, cfg)


if __name__ == "__main__":
    main()
