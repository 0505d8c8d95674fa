"""Timing primitives: the machine's matmul peak (MFU's denominator), step clocks, one mixer
layer's time and memory against T, and decoding time per token against the cache's fill.

Figures are printed by scripts/bench.py, never asserted in tests. Memory on CPU is the peak
resident set size of a fresh worker process above its baseline (so every allocation the layer
makes counts, whichever allocator made it); on CUDA it is torch's peak allocated memory.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import lightning as L
import torch
from torch import nn

PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_for(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_shapes(model: nn.Module, rows: int) -> list[tuple[int, int, int]]:
    """The model's GEMMs as (m, k, n): every distinct nn.Linear applied to `rows` tokens."""
    shapes = {
        (rows, m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)
    }
    return sorted(shapes)


def matmul_peak(
    shapes: list[tuple[int, int, int]],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seconds: float = 0.25,
) -> dict:
    """The best FLOP/s torch.mm reaches on these (m, k, n) shapes in this dtype: the machine's
    matmul peak as this model can use it (the MFU denominator). Each shape runs `seconds`."""
    device = torch.device(device)
    best, best_shape = 0.0, None
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        for _ in range(3):  # warm up (oneDNN / cuBLAS pick their kernels)
            torch.mm(a, b, out=out)
        _sync(device)
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for _ in range(4):
                torch.mm(a, b, out=out)
            _sync(device)
            reps += 4
        flops = 2 * m * k * n * reps / elapsed
        if flops > best:
            best, best_shape = flops, (m, k, n)
    return {"flops_per_s": best, "shape": best_shape}


class StepClock(L.Callback):
    """Time stamps at the end of every training batch: the intervals are whole steps (data,
    forward, backward, optimizer, logging, callbacks)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        _sync(pl_module.device)
        self.stamps.append(time.perf_counter())


def step_figures(stamps: list[float], warmup: int, tokens_per_step: int) -> dict[str, float]:
    """Median ms/step and tokens/s of the intervals between stamps after `warmup` steps."""
    intervals = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]
    if not intervals:
        raise ValueError(f"{len(stamps)} steps timed; need warmup ({warmup}) + at least 2")
    median = statistics.median(intervals)
    return {"ms_per_step": 1e3 * median, "tokens_per_s": tokens_per_step / median}


def layer_timing(
    make_layer: Callable[[], nn.Module],
    *,
    d_model: int,
    seq_len: int,
    batch_size: int = 1,
    repeats: int = 3,
    precision: str = "32-true",
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Median forward+backward ms of one layer on [B, T, D] input, and its peak memory (MiB)."""
    device = torch.device(device)
    torch.manual_seed(0)
    layer = make_layer().to(device)
    x = torch.randn(batch_size, seq_len, d_model, device=device, requires_grad=True)
    baseline = _peak_memory_mb(device, reset=True)
    times = []
    for _ in range(repeats + 1):  # the first run warms up and is not timed
        _sync(device)
        start = time.perf_counter()
        with autocast_for(precision, device):
            y = layer(x)
        y.float().square().mean().backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    peak = _peak_memory_mb(device) - baseline
    return {"ms": 1e3 * statistics.median(times[1:]), "peak_mb": peak}


def _peak_memory_mb(device: torch.device, reset: bool = False) -> float:
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _layer_worker(args: tuple) -> dict[str, float]:
    make_layer, kwargs = args
    torch.set_num_threads(kwargs.pop("threads"))
    return layer_timing(make_layer, **kwargs)


def layer_costs(
    make_layer: Callable[[], nn.Module], seq_lens: list[int], *, d_model: int, **kwargs
) -> list[dict[str, float]]:
    """layer_timing for each T, each in a fresh process so that peak memory is its own."""
    ctx = mp.get_context("spawn")
    rows = []
    for T in seq_lens:
        job = (
            make_layer,
            {"d_model": d_model, "seq_len": T, "threads": torch.get_num_threads(), **kwargs},
        )
        with ctx.Pool(1) as pool:
            rows.append({"T": T, **pool.apply(_layer_worker, (job,))})
    return rows


@torch.no_grad()
def decode_timings(
    model: nn.Module,
    positions: list[int],
    *,
    steps: int = 20,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """Median ms per generated token when the caches already hold about `position` tokens.

    The caches are filled by prefill forwards (chunks of at most 1024 tokens) up to each
    position, then `steps` one-token forwards are timed. Flat figures across positions mean
    decoding cost does not grow with the length generated so far.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    positions = sorted(positions)
    total = positions[-1] + steps + 1
    tokens = torch.randint(0, model.vocab_size, (batch_size, total), device=device)
    caches = model.init_caches(batch_size, total, device=device)
    rows, filled = [], 0
    for position in positions:
        while filled < position:
            n = min(1024, position - filled)
            model(tokens[:, filled : filled + n], caches)
            filled += n
        start_position, times = filled, []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            model(tokens[:, filled : filled + 1], caches)
            _sync(device)
            times.append(time.perf_counter() - start)
            filled += 1
        rows.append({"position": start_position, "ms_per_token": 1e3 * statistics.median(times)})
    return rows
