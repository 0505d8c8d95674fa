"""How a run executes on this machine: precision, threads, matmul precision, malloc, compile."""

from __future__ import annotations

import ctypes
import logging
import resource
from collections.abc import Callable

import torch
from omegaconf import DictConfig, open_dict
from torch import nn

from lmkit.run.cpu_precision import config_gemm_shapes, cpu_precision

log = logging.getLogger(__name__)

# glibc's malloc option numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, cfg: DictConfig) -> str:
    """trainer.precision=auto: bf16-mixed on GPUs with bfloat16 (16-mixed on older ones); on a
    CPU, bf16-mixed where bf16 GEMMs at the model's shapes measure at least
    runtime.auto_bf16_speedup times faster than fp32 (lmkit.run.cpu_precision), else 32-true:
    without fast bf16, autocast only adds casts around slow matmuls (docs/performance.md)."""
    if precision != "auto":
        return precision
    if on_gpu(str(cfg.trainer.accelerator)):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return cpu_precision(config_gemm_shapes(cfg), float(cfg.runtime.auto_bf16_speedup))


def check_precision(precision: str, accelerator: str) -> None:
    """Refuse a precision the device cannot run instead of silently changing the numerics."""
    gpu = on_gpu(accelerator)
    if precision in ("16-mixed", "16-true") and not gpu:
        raise ValueError(
            f"trainer.precision={precision} needs a CUDA GPU (fp16 autocast with loss "
            f"scaling); on CPU use bf16-mixed or 32-true"
        )
    if precision.startswith("bf16") and gpu and not torch.cuda.is_bf16_supported():
        raise ValueError(f"trainer.precision={precision}: this GPU has no bfloat16; use 16-mixed")


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the OS.

    A training step frees and reallocates the same large activations every step; by default
    glibc serves them with fresh mmap pages and trims the heap after each free, so every step
    pays page faults on first touch (docs/throughput.md). Serving blocks up to 32 MiB (glibc's
    largest threshold) from the heap and never trimming it removes them; the process keeps its
    peak memory. No-op off glibc (macOS, Windows, musl): returns whether the settings took.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def apply_runtime_settings(cfg: DictConfig) -> None:
    """Resolve trainer.precision=auto (in cfg, so checkpoints record what ran) and apply the
    `runtime` section: fp32 matmul precision, thread count, malloc's reuse of freed memory."""
    keep_freed_memory()
    with open_dict(cfg):
        cfg.trainer.precision = resolve_precision(str(cfg.trainer.precision), cfg)
    torch.set_float32_matmul_precision(cfg.runtime.float32_matmul_precision)
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))


def peak_memory_mb() -> float:
    """Peak accelerator memory when on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# Where torch's compilation errors come from: dynamo (tracing) and inductor (code generation).
COMPILER_MODULES = ("torch._dynamo", "torch._inductor")


def is_compile_error(err: BaseException) -> bool:
    """Whether err is torch.compile failing (not the model's own error, nor out of memory)."""
    return type(err).__module__.startswith(COMPILER_MODULES)


class CompileOrEager:
    """A module's forward under torch.compile that falls back to eager, with one logged
    message, when the backend cannot compile it (no C++ compiler for inductor on CPU, an
    unsupported platform, an operation dynamo cannot trace). Compilation happens on the
    first call; that call runs eager again if it fails. Any other error (out of memory, a bug
    in the model) propagates: the rest of the run does not silently change paths."""

    def __init__(self, forward: Callable) -> None:
        self.eager = forward
        self.compiled: Callable | None = torch.compile(forward)

    def __call__(self, *args, **kwargs):
        if len(args) > 1 or kwargs.get("caches") is not None:
            return self.eager(*args, **kwargs)  # decoding with caches: shapes change every call
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:
                if not is_compile_error(err):
                    raise
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                log.warning(
                    "runtime.compile=true: torch.compile failed (%s: %s); training runs eager",
                    type(err).__name__,
                    reason,
                )
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_model(model: nn.Module) -> nn.Module:
    """Compile the model's forward in place (parameter names and checkpoints are unchanged).
    Calls with caches (decoding) stay eager; tasks that read hidden states run eager
    too: compile speeds up the plain LM forward only."""
    model.forward = CompileOrEager(model.forward)
    log.info("runtime.compile=true: the training forward is compiled on its first call")
    return model
