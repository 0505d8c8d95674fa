"""Print measured costs of a config (figures, not assertions).

  python scripts/bench.py experiment=shakespeare_char_cpu
  python scripts/bench.py model/mixer=softmax model.mixer.backend=tiled bench.what=[layer]
  python scripts/bench.py bench.seq_lens=[256,1024,4096] bench.device=cuda

train: median ms/step and tokens/s of a full training step (forward, backward, clip, AdamW) on
random tokens of the config's batch and block size, and the process's peak memory.
layer: forward+backward ms and peak memory of one mixer layer (d_model of the config) per T.
decode: ms per generated token with the caches filled to each of bench.decode_positions
(positional tables are sized to fit; use model/embedding=rope or none for unbounded models).

bench.save=path/bench.json also writes the figures as JSON; a bench.json inside a sweep's job
folder feeds the throughput plot of scripts/compare.py.
"""

import functools
import json
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from lmkit.bench import decode_timings, layer_costs, train_step_timings
from lmkit.cli import run_cli
from lmkit.training import build_model, peak_memory_mb


def bench(cfg: DictConfig) -> None:
    console, b = Console(), cfg.bench
    saved: dict = {}
    precision = cfg.trainer.precision
    mixer = cfg.model.mixer._target_.rsplit(".", 1)[1]
    options = dict(cfg.model.mixer)
    shown = ("backend", "mode", "pattern", "scan", "chunk_size", "window")
    label = " ".join([mixer, *(f"{k}={options[k]}" for k in shown if k in options)])
    if "train" in b.what:
        model = build_model(cfg, vocab_size=65)
        figures = train_step_timings(
            model,
            batch_size=cfg.data.batch_size,
            block_size=cfg.data.block_size,
            steps=b.steps,
            warmup=b.warmup,
            precision=precision,
            device=b.device,
        )
        saved["train"] = {**figures, "peak_mb": peak_memory_mb(), "params": model.num_params()}
        console.print(
            f"[bold]train step[/] {label}, {model.num_params():,} params, "
            f"B={cfg.data.batch_size} T={cfg.data.block_size} {precision}: "
            f"{figures['ms_per_step']:.1f} ms/step, "
            f"{figures['tokens_per_s']:,.0f} tokens/s, "
            f"peak memory {peak_memory_mb():.0f} MiB"
        )
    if "layer" in b.what:
        make_layer = functools.partial(instantiate(cfg.model.mixer), cfg.model.d_model)
        rows = layer_costs(
            make_layer,
            list(b.seq_lens),
            d_model=cfg.model.d_model,
            batch_size=b.layer_batch_size,
            repeats=b.layer_repeats,
            precision=precision,
            device=b.device,
        )
        saved["layer"] = [{**r, "batch_size": b.layer_batch_size} for r in rows]
        table = Table(
            title=f"one {label} layer, d_model={cfg.model.d_model}, forward+backward, {precision}"
        )
        for col in ("T", "ms", "ms / 1k tokens", "peak MiB"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                str(r["T"]),
                f"{r['ms']:.1f}",
                f"{1e3 * r['ms'] / r['T']:.2f}",
                f"{r['peak_mb']:.1f}",
            )
        console.print(table)
    if "decode" in b.what:
        longest = max(b.decode_positions) + b.decode_steps + 1
        with open_dict(cfg):
            cfg.model.embedding.max_len = max(cfg.model.embedding.max_len, longest)
        model = build_model(cfg, vocab_size=65)
        rows = decode_timings(
            model, list(b.decode_positions), steps=b.decode_steps, device=b.device
        )
        table = Table(title=f"decoding with {label} caches, batch 1")
        table.add_column("position", justify="right")
        table.add_column("ms / token", justify="right")
        for r in rows:
            table.add_row(str(r["position"]), f"{r['ms_per_token']:.2f}")
        console.print(table)
        saved["decode"] = rows
    if b.get("save"):
        Path(b.save).parent.mkdir(parents=True, exist_ok=True)
        Path(b.save).write_text(json.dumps({"label": label, **saved}, indent=2))
        console.print(f"written: {b.save}")


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    run_cli(bench, cfg)


if __name__ == "__main__":
    main()
