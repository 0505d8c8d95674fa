"""Where one mixer layer's forward + backward time goes on its device: torch.profiler's self time
per operator, split into matrix products and the rest (elementwise work, reductions, copies, the
fused kernels of lmkit.ops). A layer whose time sits outside its matmuls is bound by memory
traffic or by Python/launch overhead rather than by arithmetic, and is a candidate for fusion."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lmkit.run.timing import autocast_for

# Operators that are matrix products (their self time is GEMM time; attention's fused kernels
# are mostly GEMMs on a CPU).
MATMUL_OPS = frozenset({
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
})


def layer_profile(
    make_layer: Callable[[], nn.Module],
    *,
    d_model: int,
    seq_len: int,
    batch_size: int,
    repeats: int,
    precision: str,
    device: str | torch.device = "cpu",
    top: int = 8,
) -> dict:
    """Self time (ms per forward + backward) of the `top` operators, the matmuls' share and the
    total, over `repeats` profiled runs after one warm-up."""
    device = torch.device(device)
    torch.manual_seed(0)
    layer = make_layer().to(device)
    x = torch.randn(batch_size, seq_len, d_model, device=device, requires_grad=True)

    def run() -> None:
        with autocast_for(precision, device):
            y = layer(x)
        y.float().square().mean().backward()

    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            run()
    self_ms = {
        e.key: e.self_device_time_total / 1e3 / repeats
        if device.type == "cuda" else e.self_cpu_time_total / 1e3 / repeats
        for e in prof.key_averages()
    }
    total = sum(self_ms.values())
    matmul = sum(ms for name, ms in self_ms.items() if name in MATMUL_OPS)
    ops = sorted(self_ms.items(), key=lambda kv: -kv[1])[:top]
    return {
        "seq_len": seq_len,
        "ms": total,
        "matmul_share": matmul / total if total else 0.0,
        "top_ops": [{"op": name, "ms": ms, "share": ms / total} for name, ms in ops],
    }
