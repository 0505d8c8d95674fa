"""Print measured costs of a config (figures, not assertions).

  python scripts/bench.py experiment=shakespeare_char_cpu --bare
  python scripts/bench.py model/mixer=linear model.compile=true --steps 30
  python scripts/bench.py model/mixer=softmax model.mixer.backend=tiled bench.what=[layer]
  python scripts/bench_mixers.py model.d_model=384 ...   # the train figures of every mixer

train: training steps of the config through lmkit's Lightning path (train.py's trainer and
callbacks, real data, no validation): median ms/step and tokens/s after warm-up, peak memory,
model FLOPs per token (lmkit.flops: every mixer, MLP and head matmul), achieved FLOP/s, and MFU
against this machine's matmul peak, which bench measures itself (fp32 and bf16 GEMMs at the
model's shapes). --bare (bench.bare=true) also runs the same model, data, optimizer and
precision in a plain PyTorch loop and prints the Lightning/bare throughput ratio: of each path's
fastest run, and the median and range of each round's back-to-back pair (lightning_over_bare and
lightning_over_bare_rounds in the saved figures).
layer: forward+backward ms and peak memory of one mixer layer (d_model of the config) per T.
decode: ms per generated token with the caches filled to each of bench.decode_positions
(positional tables are sized to fit; use model/embedding=rope or none for unbounded models).

Flags: --bare (bench.bare=true), --steps N (bench.steps=N).
bench.save=path/bench.json also writes the figures as JSON; a bench.json inside a sweep's job
folder feeds the throughput plot of scripts/compare.py.
"""

import functools
import json
import statistics
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from lmkit.bench import (
    bare_step_timings,
    decode_timings,
    gemm_shapes,
    layer_costs,
    lightning_step_timings,
    matmul_peak,
)
from lmkit.cli import run_cli
from lmkit.training import apply_runtime_settings, build_model, peak_memory_mb

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mfu_basis(precision: str) -> str:
    """The dtype the matmuls run in under this precision: MFU's denominator."""
    if precision.startswith("bf16"):
        return "bf16"
    return "fp16" if precision.startswith("16") else "fp32"


def train_figures(cfg: DictConfig, console: Console, label: str) -> dict:
    """Lightning path (and the bare loop), FLOPs, matmul peaks and MFU; printed and returned."""
    b, precision = cfg.bench, str(cfg.trainer.precision)
    paths = {"lightning": lightning_step_timings}
    if b.bare:
        paths["bare"] = functools.partial(bare_step_timings, device=b.device)
    # Rounds alternate the paths, and each path keeps its fastest round: step times drift by a
    # few percent between runs on a shared CPU, as much as the framework's overhead.
    runs: dict[str, dict] = {}
    pairs = []  # each round's Lightning / bare: back-to-back runs see the same machine state
    for _ in range(max(1, b.rounds)):
        this_round = {}
        for name, timed in paths.items():
            run = this_round[name] = timed(cfg, steps=b.steps, warmup=b.warmup)
            if name not in runs or run["ms_per_step"] < runs[name]["ms_per_step"]:
                runs[name] = run
        if "bare" in this_round:
            pairs.append(
                this_round["lightning"]["tokens_per_s"] / this_round["bare"]["tokens_per_s"]
            )
    peak_mb = peak_memory_mb()
    model = runs["lightning"]["model"]
    runs = {name: {k: v for k, v in run.items() if k != "model"} for name, run in runs.items()}
    flops = model.flops_per_token(cfg.data.block_size)
    rows = cfg.data.batch_size * cfg.data.block_size
    shapes = gemm_shapes(model, rows)
    basis = mfu_basis(precision)  # MFU against the peak of the dtype the matmuls run in
    wanted = {"fp32", "bf16", basis}  # fp16 only where it runs (16-mixed needs a GPU)
    peaks = {
        name: matmul_peak(shapes, dtype, b.device, seconds=b.peak_seconds)
        for name, dtype in PEAK_DTYPES.items()
        if name in wanted
    }
    for run in runs.values():
        run["flops_per_s"] = flops["train"] * run["tokens_per_s"]
        run["mfu"] = run["flops_per_s"] / peaks[basis]["flops_per_s"]
    table = Table(
        title=f"training {label}, {model.num_params():,} params, B={cfg.data.batch_size} "
        f"T={cfg.data.block_size}, {precision}" + (", compiled" if cfg.model.get("compile") else "")
    )
    for col in ("path", "ms / step", "tokens / s", "GFLOP/s", f"MFU ({basis} peak)"):
        table.add_column(col, justify="right")
    for name, run in runs.items():
        table.add_row(
            name,
            f"{run['ms_per_step']:.1f}",
            f"{run['tokens_per_s']:,.0f}",
            f"{run['flops_per_s'] / 1e9:,.1f}",
            f"{100 * run['mfu']:.1f}%",
        )
    console.print(table)
    console.print(
        f"model FLOPs per token: {flops['train'] / 1e6:,.2f} M (training; forward "
        f"{flops['forward'] / 1e6:,.2f} M: mixers {flops['mixer'] / 1e6:,.2f} M, MLPs "
        f"{flops['mlp'] / 1e6:,.2f} M, head {flops['head'] / 1e6:,.2f} M"
        + (f", resampling {flops['resample'] / 1e6:,.2f} M" if "resample" in flops else "")
        + ")"
    )
    for name, peak in peaks.items():
        m, k, n = peak["shape"]
        console.print(
            f"matmul peak {name}: {peak['flops_per_s'] / 1e9:,.1f} GFLOP/s "
            f"(best of the model's {len(shapes)} GEMM shapes: {m}x{k} @ {k}x{n})"
        )
    console.print(f"peak memory of the bench process (all paths and rounds): {peak_mb:,.0f} MiB")
    figures = {
        **runs,
        "precision": precision,
        "compile": bool(cfg.model.get("compile")),
        "params": model.num_params(),
        "flops_per_token": flops,
        "matmul_peak": peaks,
        "mfu_basis": basis,
        "peak_mb": peak_mb,
        # the Lightning path's figures at the top level (what the sweep report reads)
        "tokens_per_s": runs["lightning"]["tokens_per_s"],
        "ms_per_step": runs["lightning"]["ms_per_step"],
        "mfu": runs["lightning"]["mfu"],
    }
    if "bare" in runs:
        figures["lightning_over_bare"] = (
            runs["lightning"]["tokens_per_s"] / runs["bare"]["tokens_per_s"]
        )
        figures["lightning_over_bare_rounds"] = pairs
        console.print(
            f"[bold]Lightning / bare throughput: {figures['lightning_over_bare']:.3f}[/] (fastest "
            f"run of each path; per round: median {statistics.median(pairs):.3f}, "
            f"{min(pairs):.3f}-{max(pairs):.3f} over {len(pairs)} rounds)"
        )
    return figures


def bench(cfg: DictConfig) -> None:
    console, b = Console(), cfg.bench
    saved: dict = {}
    precision = cfg.trainer.precision
    mixer = cfg.model.mixer._target_.rsplit(".", 1)[1]
    options = dict(cfg.model.mixer)
    shown = ("backend", "mode", "pattern", "scan", "chunk_size", "window")
    label = " ".join([mixer, *(f"{k}={options[k]}" for k in shown if k in options)])
    if cfg.model._target_.endswith("HourglassLM"):
        m = cfg.model
        label = f"hourglass shorten={list(m.shorten)} {m.downsample}/{m.upsample} of {label}"
    if "train" in b.what:
        saved["train"] = train_figures(cfg, console, label)
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


FLAGS = {"--bare": "bench.bare=true", "--steps": "bench.steps={}"}


def translate_flags(argv: list[str]) -> list[str]:
    """--bare and --steps N (or --steps=N) as the Hydra overrides they stand for."""
    out, args = [], iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name == "--bare":
            out.append(FLAGS["--bare"])
        elif name == "--steps":
            out.append(FLAGS["--steps"].format(value or next(args, "")))
        else:
            out.append(arg)
    return out


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    with open_dict(cfg):
        if cfg.bench.device == "auto":
            cfg.bench.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.trainer.accelerator == "auto":
            cfg.trainer.accelerator = "gpu" if cfg.bench.device == "cuda" else "cpu"
    apply_runtime_settings(cfg)  # precision=auto, matmul precision, threads: as train.py
    run_cli(bench, cfg)


if __name__ == "__main__":
    sys.argv[1:] = translate_flags(sys.argv[1:])
    main()
