"""Mamba's selective scan on the CPU: the fused loop against the chunked PyTorch scan and,
optionally, mamba.py's parallel (Blelloch) scan, forward + backward, side by side in one process.

  python scripts/bench_scan.py                            # T = 512, 2048, 8192
  python scripts/bench_scan.py mambapy=/tmp/scratch/mamba.py   # + mamba.py's parallel scan
  python scripts/bench_scan.py lengths=[512,2048] repeats=5 threads=2

mamba.py is not a dependency: put a checkout of alxndrTL/mamba.py (its `mambapy` package) in a
scratch folder and name that folder. The scans take the same inputs as the Mamba layer at
d_model 128, expand 2 (D = 256 channels), d_state 16, batch 4, float32 (conf/bench_scan.yaml).
Rows: median ms of a forward + backward (the candidates alternate within each repeat), ms per
1k tokens (flat = linear in T), the speedup of the fused scan, and the fused scan's FLOP rate
against the machine's fp32 matmul peak (scan FLOPs: 7 per token, channel and state forward, x3
for forward + backward). Then the whole layer (lmkit.mixers.mamba.Mamba), scan=fused against
scan=parallel.
"""

from __future__ import annotations

import statistics
import sys
import time

import hydra
import torch
from omegaconf import DictConfig

from lmkit.errors import MissingExtraError
from lmkit.mixers.mamba import Mamba
from lmkit.mixers.selective_scan import fused_available, selective_scan
from lmkit.run.cli import run_cli
from lmkit.run.runtime import keep_freed_memory
from lmkit.run.timing import matmul_peak


def scan_inputs(batch: int, T: int, channels: int, d_state: int, seed: int = 0) -> list:
    """Inputs with the ranges of a trained layer's: dt in (1e-3, 0.1) after softplus, A < 0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, channels, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(batch, T, channels, generator=g) - 4)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1)
    B, C = torch.randn(2, batch, T, d_state, generator=g)
    D = torch.ones(channels)
    return [t.requires_grad_() for t in (x, dt, A, B, C, D)]


def mambapy_scan(folder: str):
    """mamba.py's MambaBlock.selective_scan (a method that does not use self)."""
    sys.path.insert(0, folder)
    from mambapy.mamba import MambaBlock

    return lambda x, dt, A, B, C, D: (MambaBlock.selective_scan(None, x, dt, A, B, C, D), None)


def time_once(fn, inputs) -> float:
    start = time.perf_counter()
    y, _ = fn(*inputs)
    y.square().mean().backward()
    elapsed = time.perf_counter() - start
    for t in inputs:
        t.grad = None
    return elapsed


def alternate(candidates: dict, make_inputs, repeats: int) -> dict[str, float]:
    """Median seconds of each candidate; the first round warms up (compiles) and is dropped."""
    times = {name: [] for name in candidates}
    for _ in range(repeats + 1):
        for name, fn in candidates.items():
            times[name].append(time_once(fn, make_inputs()))
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def scan_table(cfg, peak: float) -> None:
    candidates = {
        "fused": lambda *a: selective_scan(*a, mode="fused"),
        "chunked": lambda *a: selective_scan(*a, mode="parallel"),
    }
    if cfg.mambapy:
        candidates["mamba.py pscan"] = mambapy_scan(cfg.mambapy)
    channels = cfg.expand * cfg.d_model
    print(f"\nselective scan, forward + backward: batch {cfg.batch}, {channels} channels, "
          f"d_state {cfg.d_state}, fp32")
    print(f"{'T':>6} {'scan':>15} {'ms':>9} {'ms / 1k tok':>12} {'fused x':>8}")
    for T in cfg.lengths:
        secs = alternate(
            candidates, lambda T=T: scan_inputs(cfg.batch, T, channels, cfg.d_state),
            cfg.repeats,
        )
        tokens = cfg.batch * T
        for name, s in secs.items():
            print(f"{T:>6} {name:>15} {1e3 * s:>9.2f} {1e6 * s / tokens:>12.3f} "
                  f"{s / secs['fused']:>8.1f}")
        flops = 3 * 7 * tokens * channels * cfg.d_state
        rate = flops / secs["fused"]
        print(f"{T:>6} fused: {rate / 1e9:.1f} GFLOP/s, {100 * rate / peak:.1f}% of the "
              f"fp32 matmul peak")


def layer_table(cfg) -> None:
    print(f"\nMamba layer (d_model {cfg.d_model}), forward + backward, batch {cfg.batch}")
    print(f"{'T':>6} {'scan':>10} {'ms':>9} {'fused x':>8}")
    for T in cfg.lengths:
        layers = {}
        for scan in ("fused", "parallel"):
            torch.manual_seed(0)
            layers[scan] = Mamba(cfg.d_model, d_state=cfg.d_state, expand=cfg.expand, scan=scan)
        x = torch.randn(cfg.batch, T, cfg.d_model)

        def run(layer, x=x):
            return layer(x), None

        secs = alternate(
            {scan: lambda *_, layer=layer: run(layer) for scan, layer in layers.items()},
            lambda: [], cfg.repeats,
        )
        for scan, s in secs.items():
            print(f"{T:>6} {scan:>10} {1e3 * s:>9.2f} {s / secs['fused']:>8.1f}")


def bench(cfg: DictConfig) -> None:
    if not fused_available():
        raise MissingExtraError("the fused scan needs numba: pip install numba")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    keep_freed_memory()  # as training does: large buffers reused, not page-faulted in each call
    channels = cfg.expand * cfg.d_model
    peak = matmul_peak([(cfg.batch * 512, channels, channels)], torch.float32)["flops_per_s"]
    print(f"{torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    scan_table(cfg, peak)
    layer_table(cfg)


@hydra.main(config_path="../conf", config_name="bench_scan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(bench, cfg)


if __name__ == "__main__":
    main()
