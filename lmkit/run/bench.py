"""scripts/bench.py's measurements of a config: training throughput through lmkit's Lightning
path and a bare PyTorch loop, FLOPs, the machine's matmul peak and MFU, one mixer layer's time
and memory against T, and decoding time per token against the cache's fill.

The config-free timing primitives live in lmkit.run.timing; the tables in lmkit.run.bench_report.
Figures are printed (and saved with bench.save), never asserted in tests.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, open_dict
from rich.console import Console
from torch import nn

from lmkit.run.bench_report import print_decode, print_layer, print_profile, print_train
from lmkit.run.build import build_datamodule, build_model, build_task, build_trainer
from lmkit.run.layer_profile import layer_profile
from lmkit.run.runtime import apply_runtime_settings, compile_model, peak_memory_mb
from lmkit.run.timing import (
    StepClock,
    _sync,
    autocast_for,
    decode_timings,
    gemm_shapes,
    layer_costs,
    matmul_peak,
    step_figures,
)
from lmkit.task import masked_mean_nll

PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the mixer options that name a variant in the label of the tables and the saved figures
LABEL_OPTIONS = ("backend", "mode", "pattern", "scan", "chunk_size", "window")


def _timed_run(cfg: DictConfig, steps: int, warmup: int):
    """cfg with max_steps = the timed run's length, its data module and a fresh seeded model."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.trainer.max_steps = warmup + steps + 1
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    model = build_model(cfg, datamodule.vocab_size)
    if cfg.runtime.compile:
        compile_model(model)
    return cfg, datamodule, model


def lightning_step_timings(cfg: DictConfig, *, steps: int, warmup: int) -> dict:
    """Train steps of cfg through lmkit's Lightning path (train.py's trainer, callbacks, CSV
    logger and progress bar; no validation) on the real data: median ms/step and tokens/s."""
    cfg, datamodule, model = _timed_run(cfg, steps, warmup)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(
            cfg,
            Path(run_dir),
            loggers=[CSVLogger(run_dir, name="", version="")],
            extra_callbacks=[clock],
            limit_val_batches=0,
            enable_model_summary=False,
        )
        trainer.fit(build_task(cfg, model, datamodule), datamodule=datamodule)
    tokens = cfg.data.batch_size * cfg.data.block_size
    return {**step_figures(clock.stamps, warmup, tokens), "model": model}


def bare_step_timings(cfg: DictConfig, *, steps: int, warmup: int, device: str = "cpu") -> dict:
    """The same model, data, optimizer, schedule, clipping and precision in a plain PyTorch
    loop: what the framework's path is compared with."""
    cfg, datamodule, model = _timed_run(cfg, steps, warmup)
    device = torch.device(device)
    model = model.to(device).train()
    # the task on the device too: configure_optimizers picks fused AdamW on CUDA and CPU from it
    configured = build_task(cfg, model, datamodule).to(device).configure_optimizers()
    optimizer = configured["optimizer"]
    scheduler = configured["lr_scheduler"]["scheduler"]
    precision, clip = str(cfg.trainer.precision), cfg.trainer.gradient_clip_val
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    params = [p for p in model.parameters() if p.requires_grad]
    stamps = []
    for x, y in datamodule.train_dataloader():
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(precision, device):
            loss = masked_mean_nll(model(x), y)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        stamps.append(time.perf_counter())
        if len(stamps) > warmup + steps:
            break
    tokens = cfg.data.batch_size * cfg.data.block_size
    return {**step_figures(stamps, warmup, tokens), "model": model}


def mfu_basis(precision: str) -> str:
    """The dtype the matmuls run in under this precision: MFU's denominator."""
    if precision.startswith("bf16"):
        return "bf16"
    return "fp16" if precision.startswith("16") else "fp32"


def timed_rounds(cfg: DictConfig) -> tuple[dict[str, dict], list[float]]:
    """Each path's fastest run over bench.rounds, and each round's Lightning / bare ratio.

    Rounds alternate the paths, and each path keeps its fastest round: step times drift by a
    few percent between runs on a shared CPU, as much as the framework's overhead. The ratio
    of a round compares back-to-back runs, which see the same machine state.
    """
    b = cfg.bench
    paths = {"lightning": lightning_step_timings}
    if b.bare:
        paths["bare"] = functools.partial(bare_step_timings, device=b.device)
    runs: dict[str, dict] = {}
    pairs = []
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
    return runs, pairs


def matmul_peaks(cfg: DictConfig, shapes: list[tuple[int, int, int]], basis: str) -> dict:
    """The matmul peak at the model's GEMM shapes in fp32, bf16 and the MFU basis (fp16 only
    where it runs: 16-mixed needs a GPU)."""
    wanted = {"fp32", "bf16", basis}
    return {
        name: matmul_peak(shapes, dtype, cfg.bench.device, seconds=cfg.bench.peak_seconds)
        for name, dtype in PEAK_DTYPES.items()
        if name in wanted
    }


def train_figures(cfg: DictConfig, console: Console, label: str) -> dict:
    """Lightning path (and the bare loop), FLOPs, matmul peaks and MFU; printed and returned."""
    precision = str(cfg.trainer.precision)
    runs, pairs = timed_rounds(cfg)
    peak_mb = peak_memory_mb()
    model = runs["lightning"]["model"]
    runs = {name: {k: v for k, v in run.items() if k != "model"} for name, run in runs.items()}
    flops = model.flops_per_token(cfg.data.block_size)
    shapes = gemm_shapes(model, cfg.data.batch_size * cfg.data.block_size)
    basis = mfu_basis(precision)  # MFU against the peak of the dtype the matmuls run in
    peaks = matmul_peaks(cfg, shapes, basis)
    for run in runs.values():
        run["flops_per_s"] = flops["train"] * run["tokens_per_s"]
        run["mfu"] = run["flops_per_s"] / peaks[basis]["flops_per_s"]
    figures = {
        **runs,
        "precision": precision,
        "compile": bool(cfg.runtime.compile),
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
    print_train(console, figures, label, cfg.data.batch_size, cfg.data.block_size, len(shapes))
    return figures


def bench_label(cfg: DictConfig) -> str:
    """The mixer (and its variant options), or the hourglass around it: what the tables name."""
    mixer = cfg.model.mixer._target_.rsplit(".", 1)[1]
    options = dict(cfg.model.mixer)
    label = " ".join([mixer, *(f"{k}={options[k]}" for k in LABEL_OPTIONS if k in options)])
    if cfg.model._target_.endswith("HourglassLM"):
        m = cfg.model
        label = f"hourglass shorten={list(m.shorten)} {m.downsample}/{m.upsample} of {label}"
    return label


def layer_figures(cfg: DictConfig, console: Console, label: str) -> list[dict]:
    """Forward+backward ms and peak memory of one mixer layer at each of bench.seq_lens."""
    b, precision = cfg.bench, str(cfg.trainer.precision)
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
    print_layer(console, rows, label, cfg.model.d_model, precision)
    return [{**r, "batch_size": b.layer_batch_size} for r in rows]


def decode_figures(cfg: DictConfig, console: Console, label: str) -> list[dict]:
    """ms per generated token with the caches filled to each of bench.decode_positions (the
    positional table is sized to fit)."""
    b = cfg.bench
    longest = max(b.decode_positions) + b.decode_steps + 1
    with open_dict(cfg):
        cfg.model.embedding.max_len = max(cfg.model.embedding.max_len, longest)
    model = build_model(cfg, vocab_size=65)
    rows = decode_timings(model, list(b.decode_positions), steps=b.decode_steps, device=b.device)
    print_decode(console, rows, label)
    return rows


def profile_figures(cfg: DictConfig, console: Console, label: str) -> dict:
    """One mixer layer's forward + backward at bench.profile_seq_len, by operator."""
    b = cfg.bench
    make_layer = functools.partial(instantiate(cfg.model.mixer), cfg.model.d_model)
    figures = layer_profile(
        make_layer,
        d_model=cfg.model.d_model,
        seq_len=b.profile_seq_len,
        batch_size=b.layer_batch_size,
        repeats=b.layer_repeats,
        precision=str(cfg.trainer.precision),
        device=b.device,
    )
    print_profile(console, figures, label)
    return figures


MEASUREMENTS = {
    "train": train_figures,
    "layer": layer_figures,
    "decode": decode_figures,
    "profile": profile_figures,
}


def bench(cfg: DictConfig) -> dict:
    """The measurements of bench.what, printed; written as JSON to bench.save when set."""
    console, label = Console(), bench_label(cfg)
    saved = {
        name: measure(cfg, console, label)
        for name, measure in MEASUREMENTS.items()
        if name in cfg.bench.what
    }
    if cfg.bench.save:
        path = Path(cfg.bench.save)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"label": label, **saved}, indent=2))
        console.print(f"written: {cfg.bench.save}")
    return saved


def resolve_devices(cfg: DictConfig) -> None:
    """bench.device=auto: cuda when available; trainer.accelerator=auto follows bench.device."""
    with open_dict(cfg):
        if cfg.bench.device == "auto":
            cfg.bench.device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.trainer.accelerator == "auto":
            cfg.trainer.accelerator = "gpu" if cfg.bench.device == "cuda" else "cpu"


def run_bench(cfg: DictConfig) -> dict:
    """scripts/bench.py: seed, devices, runtime settings (precision=auto, matmul precision,
    threads: as train.py), then the measurements."""
    torch.manual_seed(cfg.seed)
    resolve_devices(cfg)
    apply_runtime_settings(cfg)
    return bench(cfg)
