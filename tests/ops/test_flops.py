"""Model FLOPs per token: hand counts for tiny configs, and torch's FLOP counter where the
computed matmuls are exactly the counted ones."""

import math
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmkit.mixers.gau import GAU
from lmkit.mixers.linear import LinearAttention
from lmkit.mixers.mamba import Mamba
from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.mixers.sparse import SparseAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.mlp import MLP

V, D, H, L, T = 11, 8, 2, 2, 5


def tiny_model(mixer=None, **kw) -> DecoderLM:
    mixer = mixer or partial(SoftmaxAttention, num_heads=H, backend="naive")
    return DecoderLM(V, mixer=mixer, mlp=partial(MLP), d_model=D, num_layers=L, num_heads=H, **kw)


def counted(model: DecoderLM, seq_len: int) -> float:
    """FLOPs per token that torch's counter sees in one forward pass."""
    idx = torch.randint(0, V, (1, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(idx)
    return counter.get_total_flops() / seq_len


def test_softmax_model_matches_the_hand_count():
    f = tiny_model().flops_per_token(T)
    qkv, out = 2 * D * 3 * D, 2 * D * D  # 384, 128
    scores = 2 * 2 * D * (T + 1) / 2  # q k^T and p v, 3 keys per query on average: 96
    mlp = 2 * D * 4 * D * 2  # up and down: 1024
    head = 2 * D * V  # 176 (tied to the embedding, still a matmul)
    assert f["mixer"] == L * (qkv + out + scores) == 1216
    assert f["mlp"] == L * mlp == 2048
    assert f["head"] == head
    assert f["forward"] == 3440 and f["train"] == 3 * 3440


def test_torch_counter_agrees_and_counts_the_masked_half_as_well():
    model = tiny_model()  # naive attention: plain matmuls torch's counter sees
    # one token: causal and full attention are the same work
    assert counted(model, 1) == model.flops_per_token(1)["forward"]
    # T tokens: torch counts all T keys per query (4 d T), useful work is (T + 1) / 2 of them
    wasted = L * 4 * D * (T - (T + 1) / 2)
    assert counted(model, T) == pytest.approx(model.flops_per_token(T)["forward"] + wasted)


def test_sparse_counts_the_keys_its_pattern_allows():
    window, seq = 4, 64
    mixer = SparseAttention(D, num_heads=H, pattern="local", window=window, block_size=16)
    keys = sum(min(i + 1, window) for i in range(seq)) / seq
    assert mixer.mixing_flops(seq) == pytest.approx(4 * D * keys)
    dense = SoftmaxAttention(D, num_heads=H)
    assert mixer.mixing_flops(seq) < dense.mixing_flops(seq) / 4


def test_linear_attention_forms():
    mixer = LinearAttention(D, num_heads=H, chunk_size=4)  # elu: Dk = 4, Dv = 4 + 1 (normaliser)
    dk, dv = 4, 5
    assert mixer.flops_per_token(T) == 2 * D * 4 * D + H * (2 * (dk + dv) * 2.5 + 4 * dk * dv)
    # cost per token does not grow with T (chunk form)
    assert mixer.mixing_flops(4096) == mixer.mixing_flops(64)
    recurrent = LinearAttention(D, num_heads=H, mode="recurrent", feature_map="taylor")
    dk = 1 + 4 + 16  # taylor: 1 + d + d^2 features of the head width 4
    assert recurrent.mixing_flops(T) == H * 4 * dk * dv


def test_gau_forms():
    quadratic = GAU(D, expand=2, qk_dim=4)
    e, s = 2 * D, 4
    projections = 2 * D * (2 * e + s) + 2 * e * D
    assert quadratic.flops_per_token(T) == projections + 2 * (s + e) * (T + 1) / 2
    chunked = GAU(D, expand=2, qk_dim=4, chunk_size=2)
    assert chunked.mixing_flops(T) == 2 * (s + e) * 1.5 + 4 * s * e
    assert chunked.mixing_flops(4096) == chunked.mixing_flops(64)


def test_mamba_hand_count():
    mixer = Mamba(D, d_state=3, d_conv=4, expand=2, dt_rank=2)
    di = 2 * D
    projections = 2 * D * 2 * di + 2 * di * (2 + 2 * 3) + 2 * 2 * di + 2 * di * D
    assert mixer.flops_per_token(T) == projections + 2 * 4 * di + 7 * di * 3
    assert mixer.mixing_flops(T) == mixer.mixing_flops(10 * T)


def test_train_flops_are_three_forwards():
    f = tiny_model().flops_per_token(64)
    assert math.isclose(f["train"], 3 * f["forward"])
