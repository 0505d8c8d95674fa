"""trainer.precision=auto on a CPU: bf16-mixed where this machine's bf16 GEMMs measure faster.

Whether bf16 pays on a CPU depends on more than one feature flag: AMX tiles (Sapphire Rapids on)
and AVX-512 BF16 (Cooper Lake, AMD Zen 4) both multiply bf16 faster than fp32, plain AVX2 machines
emulate it and are slower. So `auto` times torch.mm in both dtypes at the model's own GEMM shapes
and picks bf16-mixed when bf16 is faster by `margin` (autocast adds casts around every matmul, and
the elementwise work stays fp32). The figures are cached per machine, torch version, thread
count and shapes (LMKIT_CACHE_DIR/cpu_precision.json) and logged with the choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

import torch

from lmkit.data.corpora import cache_root
from lmkit.files import atomic_write
from lmkit.run.timing import matmul_peak

log = logging.getLogger(__name__)

CACHE_FILE = "cpu_precision.json"
SECONDS_PER_SHAPE = 0.1  # per shape and dtype: the measurement takes under a second, once


def config_gemm_shapes(cfg) -> list[tuple[int, int, int]]:
    """The (m, k, n) of a GPT block's two kinds of matmul at the run's batch: d x d and d x 4d,
    with m = batch x block tokens (capped at 4096 rows: larger m changes the rate little)."""
    rows = min(4096, int(cfg.data.batch_size) * int(cfg.data.block_size))
    d = int(cfg.model.d_model)
    return [(rows, d, d), (rows, d, 4 * d)]


def cpu_precision(shapes: list[tuple[int, int, int]], margin: float) -> str:
    """bf16-mixed if bf16 GEMMs at these shapes run at least `margin` times fp32's FLOP/s."""
    speeds = gemm_speeds(shapes)
    ratio = speeds["bf16"] / speeds["fp32"]
    choice = "bf16-mixed" if ratio >= margin else "32-true"
    log.info(
        "trainer.precision=auto: %s (bf16 GEMMs %.1f GFLOP/s, fp32 %.1f GFLOP/s: %.2fx, "
        "bf16 needs %.2fx; figures cached in %s)",
        choice, speeds["bf16"] / 1e9, speeds["fp32"] / 1e9, ratio, margin, _cache_path(),
    )
    return choice


def gemm_speeds(shapes: list[tuple[int, int, int]]) -> dict[str, float]:
    """FLOP/s of torch.mm in bf16 and fp32 at these shapes (the best shape of each), cached."""
    key = _machine_key(shapes)
    cache = _read_cache()
    if key not in cache:
        cache[key] = {
            name: matmul_peak(shapes, dtype, seconds=SECONDS_PER_SHAPE)["flops_per_s"]
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
        }
        atomic_write(_cache_path(), json.dumps(cache, indent=1).encode())
    return cache[key]


def _machine_key(shapes: list[tuple[int, int, int]]) -> str:
    """What the figures depend on: the CPU (model and feature flags), torch, threads, shapes."""
    parts = [_cpu_description(), torch.__version__, str(torch.get_num_threads()), str(shapes)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = {line.split(":")[0].strip(): line for line in info.splitlines() if ":" in line}
    return lines.get("model name", "") + lines.get("flags", "")


def _cache_path() -> Path:
    return cache_root() / CACHE_FILE


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
