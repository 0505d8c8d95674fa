"""Training throughput and MFU of every mixer at one config, in one table.

  python scripts/bench_mixers.py model.d_model=384 model.num_layers=6 model.num_heads=6 \\
      data.block_size=256 data.batch_size=8 --bare

Each mixer preset in conf/model/mixer runs `scripts/bench.py bench.what=[train]` in its own
process (peak memory is a per-process figure), one after the other; every other argument
(--bare, --steps N, Hydra overrides) goes to each run. --mixers a,b picks some; --out FILE.md
also writes the table as markdown, with the figures as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ("mixer", "params", "MFLOPs / token", "ms / step", "tokens / s", "GFLOP/s", "MFU")


def mixer_presets() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "model" / "mixer").glob("*.yaml"))


def bench_one(mixer: str, args: list[str], folder: Path) -> dict:
    out = folder / f"{mixer}.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), f"model/mixer={mixer}"]
    cmd += ["bench.what=[train]", f"bench.save={out}", *args]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: bench of mixer {mixer} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())["train"]


def row(mixer: str, f: dict) -> list[str]:
    cells = [
        mixer,
        f"{f['params']:,}",
        f"{f['flops_per_token']['train'] / 1e6:,.1f}",
        f"{f['ms_per_step']:.1f}",
        f"{f['tokens_per_s']:,.0f}",
        f"{f['lightning']['flops_per_s'] / 1e9:,.1f}",
        f"{100 * f['mfu']:.1f}%",
    ]
    if "lightning_over_bare" in f:
        cells.append(f"{f['lightning_over_bare']:.3f}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixers", help="comma-separated presets (default: all)")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    known, rest = parser.parse_known_args()
    mixers = known.mixers.split(",") if known.mixers else mixer_presets()
    unknown = sorted(set(mixers) - set(mixer_presets()))
    if unknown:
        raise SystemExit(f"error: unknown mixers {unknown}; choose from {mixer_presets()}")
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for mixer in mixers:
            print(f"benchmarking {mixer} ...", file=sys.stderr, flush=True)
            figures[mixer] = bench_one(mixer, rest, Path(folder))
    first = next(iter(figures.values()))
    columns = list(COLUMNS) + (["Lightning / bare"] if "lightning_over_bare" in first else [])
    table = Table(
        title=f"training throughput per mixer ({first['precision']}, MFU against the "
        f"{first['mfu_basis']} matmul peak)"
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "mixer" else "right")
    rows = [row(m, f) for m, f in figures.items()]
    for cells in rows:
        table.add_row(*cells)
    Console().print(table)
    if known.out:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
        known.out.parent.mkdir(parents=True, exist_ok=True)
        known.out.write_text("\n".join(lines) + "\n")
        known.out.with_suffix(".json").write_text(json.dumps(figures, indent=2))
        print(f"written: {known.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
