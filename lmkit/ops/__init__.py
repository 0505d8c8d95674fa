"""Numerics shared by mixers and model: rotary positions, dropout, FLOP formulas, and the fused
CPU kernels (numba) of Mamba's selective scan and causal conv."""
