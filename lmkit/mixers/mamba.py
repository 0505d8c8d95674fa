"""Mamba: a selective state space block (Gu & Dao 2023, arXiv:2312.00752)."""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmkit.mixers.base import Mixer
from lmkit.mixers.selective_scan import MODES, fused_available, selective_scan
from lmkit.ops.cpu_causal_conv import causal_conv_silu

log = logging.getLogger(__name__)


@dataclass
class MambaCache:
    """Recurrent decoding state: constant in the number of tokens seen."""

    conv_state: Tensor  # [B, d_inner, d_conv - 1], the last inputs of the causal conv
    ssm_state: Tensor  # [B, d_inner, d_state], float32
    length: int = 0

    def select(self, rows: Tensor) -> None:
        """Keep / reorder / repeat batch rows."""
        self.conv_state, self.ssm_state = self.conv_state[rows], self.ssm_state[rows]

    def crop(self, length: int) -> None:
        """A recurrent state cannot go back in time; only the current length is accepted."""
        if length != self.length:
            raise ValueError(
                f"MambaCache holds a recurrent state after {self.length} tokens and cannot be "
                f"cropped to {length}; snapshot the cache (copy its tensors) before verifying"
            )


class Mamba(Mixer):
    """Mamba block: in_proj -> causal depthwise conv + SiLU -> selective scan -> SiLU gate -> out.

    The block replaces attention and the MLP (its preset sets `model.mlp: null`). `scan`:
    "fused" (on a CPU, one compiled loop over time, `lmkit.ops.cpu_scan`, and the causal conv
    fused with its SiLU, `lmkit.ops.cpu_causal_conv`), "parallel" (the chunked PyTorch scan with
    a hand-written backward, see `selective_scan`), or "sequential" (the reference loop over
    time). On a GPU, "fused" and "parallel" take the `mamba_ssm` CUDA kernel when it is
    importable (cache-less calls), else the chunked scan. dt_rank None or "auto" is
    ceil(d_model / 16). The scan and its state run in float32.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan: str = "fused",
        chunk_size: int = 16,
        bias: bool = False,
        conv_bias: bool = True,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx)
        for name, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if dt_rank in (None, "auto"):
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(f"dt_rank={dt_rank!r} must be an integer >= 1, 'auto' or null")
        if not 0 < dt_min <= dt_max:
            raise ValueError(
                f"dt_min={dt_min} and dt_max={dt_max} must satisfy 0 < dt_min <= dt_max"
            )
        if scan not in MODES:
            raise ValueError(f"scan={scan!r}; choose one of {list(MODES)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1")
        d_inner = expand * d_model
        self.d_state, self.d_conv, self.d_inner, self.dt_rank = d_state, d_conv, d_inner, dt_rank
        self.scan, self.chunk_size = scan, chunk_size
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)  # -> [x, z]
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)  # -> [dt, B, C]
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)  # scaled at init by the model
        self._init_dt(dt_min, dt_max)
        # S4D-real: A[d, n] = -(n + 1), stored as its log so that A stays negative.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)  # [D, N]
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(d_inner))  # skip connection x -> y
        self.A_log._no_weight_decay = self.D._no_weight_decay = True

    @torch.no_grad()
    def _init_dt(self, dt_min: float, dt_max: float, floor: float = 1e-4) -> None:
        # dt = softplus(W x + b) starts log-uniform in [dt_min, dt_max]: b = softplus^-1(dt).
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        u = torch.rand(self.d_inner)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj._skip_init = True  # the model's N(0, 0.02) / zero-bias init must not touch it

    def forward(self, x: Tensor, cache: MambaCache | None = None) -> Tensor:
        T = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)  # each [B, T, d_inner]
        if self._fused_cpu(u) and cache is None:
            bias = self.conv1d.bias if self.conv1d.bias is not None else u.new_zeros(self.d_inner)
            u = causal_conv_silu(u, self.conv1d.weight[:, 0], bias)  # [B, T, d_inner], float32
        else:
            u = F.silu(self._conv(u.transpose(1, 2), cache)).transpose(1, 2)  # [B, T, d_inner]
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # The dt bias is added in float32 (under autocast the matmul alone runs in bf16).
        dt = F.linear(dt, self.dt_proj.weight).float() + self.dt_proj.bias.float()
        dt = F.softplus(dt)  # [B, T, d_inner], float32
        A = -torch.exp(self.A_log.float())  # [d_inner, d_state]
        h0 = None if cache is None else cache.ssm_state
        y, h = self._scan(u, dt, A, B, C, h0)  # [B, T, d_inner] float32, [B, d_inner, d_state]
        if cache is not None:
            cache.ssm_state, cache.length = h, cache.length + T
        y = y.to(x.dtype) * F.silu(z)  # [B, T, d_inner]
        return self.out_proj(y)  # [B, T, d_model]

    def _fused_cpu(self, u: Tensor) -> bool:
        """scan=fused on a CPU with numba: the conv + SiLU run fused too (lmkit.ops)."""
        return self.scan == "fused" and u.device.type == "cpu" and fused_available()

    def _conv(self, u: Tensor, cache: MambaCache | None) -> Tensor:
        """Causal depthwise conv over time: u [B, d_inner, T] -> [B, d_inner, T]."""
        fused = cache is None and u.is_cuda and 2 <= self.d_conv <= 4  # the kernel's widths
        if fused and _conv_kernel() is not None:
            weight = self.conv1d.weight.squeeze(1)  # [d_inner, d_conv]
            return _conv_kernel()(u.contiguous(), weight, self.conv1d.bias, activation=None)
        if cache is None:
            past = u.new_zeros(*u.shape[:2], self.d_conv - 1)
        else:
            past = cache.conv_state.to(u.dtype)
        u = torch.cat([past, u], dim=-1)  # [B, d_inner, d_conv - 1 + T]
        if cache is not None:
            keep = u[:, :, u.shape[-1] - (self.d_conv - 1) :]
            cache.conv_state = keep.contiguous().to(cache.conv_state.dtype)
            if u.shape[-1] == self.d_conv:  # one new token: a dot product beats a conv call
                y = (u * self.conv1d.weight[:, 0]).sum(-1, keepdim=True)  # [B, d_inner, 1]
                return y if self.conv1d.bias is None else y + self.conv1d.bias[:, None]
        return self.conv1d(u)

    def _scan(self, u, dt, A, B, C, h0):
        kernel = self.scan != "sequential" and u.is_cuda and h0 is None
        if kernel and _cuda_kernel() is not None:
            u, dt, B, C = (t.float().transpose(1, 2).contiguous() for t in (u, dt, B, C))
            y, h = _cuda_kernel()(u, dt, A, B, C, D=self.D.float(), return_last_state=True)
            return y.transpose(1, 2), h  # the kernel is channels-first: [B, d_inner, T]
        return selective_scan(
            u, dt, A, B, C, D=self.D, h0=h0, mode=self.scan, chunk_size=self.chunk_size
        )

    def init_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MambaCache:
        """An empty state for `batch_size` rows; `max_len` is not needed (constant size)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        weight = self.in_proj.weight
        device, dtype = device or weight.device, dtype or weight.dtype
        return MambaCache(
            conv_state=torch.zeros(
                batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype
            ),
            ssm_state=torch.zeros(
                batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32
            ),
        )

    def mixing_flops(self, seq_len: int) -> float:
        """The depthwise causal conv (2 d_conv per channel) and the selective scan per channel
        and state: h = exp(dt A) h + (dt B) x (5 FLOPs: dt A, its product with h, dt B, its
        product with x, the add; the exp is not counted) and y = C h (2 FLOPs). Elementwise
        work, but it is Mamba's token mixing, so it is counted."""
        return 2 * self.d_conv * self.d_inner + 7 * self.d_inner * self.d_state

    def state_size(self, seq_len: int) -> int:
        """Numbers held in the cache: conv inputs and the SSM state, whatever seq_len."""
        return self.d_inner * (self.d_conv - 1 + self.d_state)


def _optional_kernel(module: str, name: str, what: str, fallback: str):
    """A fused CUDA kernel if its package imports (looked up once and logged), else None."""
    try:
        kernel = getattr(importlib.import_module(module), name)
    except (ImportError, OSError, AttributeError) as err:
        log.info("%s unavailable (%s); using %s", what, err, fallback)
        return None
    log.info("Mamba: using %s", what)
    return kernel


@functools.cache
def _conv_kernel():
    """causal-conv1d's fused causal depthwise conv, or None."""
    return _optional_kernel(
        "causal_conv1d", "causal_conv1d_fn", "the causal_conv1d kernel", "nn.Conv1d"
    )


@functools.cache
def _cuda_kernel():
    """mamba_ssm's fused selective scan, or None."""
    return _optional_kernel(
        "mamba_ssm.ops.selective_scan_interface",
        "selective_scan_fn",
        "the mamba_ssm scan kernel",
        "the PyTorch chunked scan",
    )
