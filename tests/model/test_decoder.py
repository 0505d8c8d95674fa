import functools

import pytest
import torch

from lmkit.decoding.sampling import generate
from lmkit.mixers.softmax import SoftmaxAttention
from lmkit.model.decoder import DecoderLM
from lmkit.model.embeddings import Embedding
from lmkit.model.mlp import MLP

V, D, L, H = 50, 32, 3, 4


def make_model(
    *,
    positional: str = "learned",
    tie: bool = True,
    norm: str = "layernorm",
    activation: str = "gelu",
    max_len: int = 64,
    backend: str = "naive",
) -> DecoderLM:
    return DecoderLM(
        V,
        d_model=D,
        num_layers=L,
        num_heads=H,
        norm=norm,
        tie_weights=tie,
        mixer=functools.partial(SoftmaxAttention, num_heads=H, backend=backend),
        mlp=functools.partial(MLP, activation=activation),
        embedding=functools.partial(Embedding, positional=positional, max_len=max_len),
    )


def test_shapes_and_parameter_count():
    model = make_model()
    logits = model(torch.randint(0, V, (2, 17)))
    assert logits.shape == (2, 17, V)
    block = 2 * 2 * D + 3 * D * D + D * D + 2 * 4 * D * D  # 2 LayerNorms, qkv, out, MLP
    expected = V * D + 64 * D + L * block + 2 * D  # tok + pos + blocks + final norm (tied head)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - V * D - 64 * D


def test_weight_tying():
    tied, untied = make_model(tie=True), make_model(tie=False)
    assert tied.head.proj.weight is tied.embedding.token.weight
    assert untied.head.proj.weight is not untied.embedding.token.weight
    assert untied.num_params() == tied.num_params() + V * D


def test_one_hot_equivalence():
    emb = make_model().embedding.token
    idx = torch.randint(0, V, (3, 7))
    one_hot = torch.nn.functional.one_hot(idx, V).float()
    torch.testing.assert_close(emb(idx), one_hot @ emb.weight)


def test_gpt2_init_scales_residual_projections():
    model = make_model()
    out = torch.cat([b.mixer.out_proj.weight.flatten() for b in model.blocks])
    qkv = torch.cat([b.mixer.qkv.weight.flatten() for b in model.blocks])
    assert abs(qkv.std().item() - 0.02) < 0.002
    assert abs(out.std().item() - 0.02 / (2 * L) ** 0.5) < 0.001


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rope", "none"])
@pytest.mark.parametrize("norm,activation", [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
def test_model_is_causal(positional, norm, activation):
    model = make_model(positional=positional, norm=norm, activation=activation)
    x = torch.randint(0, V, (2, 20))
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randint(0, V, x2[:, t + 1 :].shape)
        assert torch.equal(model(x)[:, : t + 1], model(x2)[:, : t + 1])
    x3 = x.clone()
    x3[:, 5] = (x3[:, 5] + 1) % V
    assert not torch.allclose(model(x)[:, 5:], model(x3)[:, 5:])  # later positions do see it


@pytest.mark.parametrize("positional", ["learned", "rope"])
def test_cached_forward_equals_parallel(positional):
    model = make_model(positional=positional).eval()
    x = torch.randint(0, V, (2, 23))
    full = model(x)
    caches = model.init_caches(2, 64)
    pieces, pos = [], 0
    for n in (5, 1, 3, 1, 8, 5):
        pieces.append(model(x[:, pos : pos + n], caches))
        pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_recomputation():
    model = make_model(max_len=64).eval()
    prompt = torch.randint(0, V, (2, 5))
    out = generate(model, prompt, 20, temperature=0)
    ref = prompt
    for _ in range(20):  # no cache: recompute the whole prefix every step
        ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def sliding_window_reference(model: DecoderLM, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding past a bounded position table, by the rule `generate` documents, with a
    plain forward of the whole window at every step (no cache): each token is predicted from the
    tokens since the window's start; when a new token makes the window longer than max_len, it
    restarts at the last max_len // 2 tokens. A prompt longer than max_len starts the window at
    its last max_len tokens."""
    max_len, seq = model.max_len, prompt
    start = max(0, prompt.shape[1] - max_len)
    for _ in range(steps):
        seq = torch.cat([seq, model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)], 1)
        if seq.shape[1] - start > max_len:
            start = seq.shape[1] - max_len // 2
    return seq


@pytest.mark.parametrize("prompt_len", [4, 21], ids=["short-prompt", "prompt-over-max-len"])
@pytest.mark.parametrize("positional", ["learned", "sinusoidal"])
def test_generate_slides_past_bounded_positions(positional, prompt_len):
    torch.manual_seed(0)
    model = make_model(positional=positional, max_len=16).eval()
    with torch.no_grad():  # std 3 / sqrt(D): greedy text that varies and depends on its window
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 3.0 / p.shape[1] ** 0.5)
    prompt = torch.randint(0, V, (2, prompt_len))
    out = generate(model, prompt, 40, temperature=0)  # several slides of the 16-token window
    ref = sliding_window_reference(model, prompt, 40)
    assert out.shape == ref.shape == (2, prompt_len + 40)
    wrong = (out != ref).nonzero().tolist()
    assert not wrong, f"generate differs from the reference first at [row, position] {wrong[0]}"


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="d_model=30 must be divisible by model.num_heads=4"):
        DecoderLM(
            V, d_model=30, num_heads=4, mixer=functools.partial(SoftmaxAttention, num_heads=4)
        )
    with pytest.raises(ValueError, match="max_len"):
        make_model(max_len=8)(torch.randint(0, V, (1, 9)))


def test_layer_multiplier_builds_more_blocks_without_mlp():
    model = DecoderLM(
        V,
        d_model=D,
        num_layers=2,
        num_heads=H,
        layer_multiplier=2,
        mlp=None,
        mixer=functools.partial(SoftmaxAttention, num_heads=H),
    )
    assert len(model.blocks) == 4 and model.num_layers == 4
    assert all(b.mlp is None and b.mlp_norm is None for b in model.blocks)
    assert len(model.init_caches(1, 8)) == 4
