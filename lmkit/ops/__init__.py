"""Numerics shared by mixers and model: rotary positions, dropout, FLOP formulas."""
