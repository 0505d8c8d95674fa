"""Medusa: trees, acceptance rules, ties, greedy equality with plain decoding, sampling, caches
after acceptance."""

import math
from types import SimpleNamespace

import pytest
import torch
from support import compose_config

from lmkit.decoding.sampling import generate
from lmkit.medusa.accept import accepted_lengths, best_path, candidate_ok, typical_threshold
from lmkit.medusa.decode import medusa_generate, plan_steps, tree_choice
from lmkit.medusa.model import MedusaLM, head_targets
from lmkit.medusa.tree import (
    calibration_text,
    check_tree,
    default_tree,
    tree_buffers,
    tree_from_accuracies,
)
from lmkit.mixers.base import TreeStep
from lmkit.run.build import build_model

VOCAB = 13


def medusa_model(
    mixer: str, *, scramble: float = 0.0, seed: int = 0, heads: int = 3, embedding: str = "rope"
):
    cfg = compose_config(
        f"model/mixer={mixer}",
        "model/embedding=none" if mixer == "mamba" else f"model/embedding={embedding}",
        "data.block_size=128",
        "run_dir=/tmp/unused",
    )
    torch.manual_seed(seed)
    model = MedusaLM(build_model(cfg, vocab_size=VOCAB), heads).eval()
    with torch.no_grad():  # heads that disagree with the LM head sometimes, agree other times
        for p in model.heads.parameters():
            p.add_(scramble * torch.randn_like(p))
    return model


# ---- trees --------------------------------------------------------------------------------------


def test_tree_checks():
    assert check_tree([(1,), (0,), (0, 0)], 2) == [(0,), (0, 0), (1,)]  # depth-first
    with pytest.raises(ValueError, match="no parent"):
        check_tree([(0,), (1, 0)], 2)
    with pytest.raises(ValueError, match="deeper than"):
        check_tree([(0,), (0, 0), (0, 0, 0)], 2)
    with pytest.raises(ValueError, match="at least one path"):
        check_tree([], 2)


def test_full_cartesian_tree_has_the_expected_node_count():
    sizes = [3, 2, 2]  # top-s_k per head
    accuracy = [[0.5] * s for s in sizes]
    expected = 3 + 3 * 2 + 3 * 2 * 2  # sum_k prod_{i<=k} s_i
    paths = tree_from_accuracies(accuracy, num_nodes=1000)
    assert len(paths) == expected
    assert len(tree_buffers(paths, 3).leaves) == 3 * 2 * 2


def test_best_first_tree_is_prefix_closed_and_sized():
    paths = default_tree(4, num_nodes=24)
    assert len(paths) == 24 and check_tree(paths, 4) == paths
    assert (0,) in paths and (0, 0) in paths


def test_tree_mask_is_each_node_and_its_ancestors():
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    buffers = tree_buffers(paths, 3)
    mask = buffers.ancestor_mask()
    nodes = [()] + buffers.paths
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            assert bool(mask[i, j]) == (a[: len(b)] == b), (a, b)
    chain = tree_buffers([(0,), (0, 0), (0, 0, 0)], 3).ancestor_mask()
    assert torch.equal(chain, torch.ones(4, 4, dtype=torch.bool).tril())


def test_leaves_list_root_to_leaf_padded():
    buffers = tree_buffers([(0,), (1,), (0, 0)], 2)
    # nodes: 0 root, 1 (0,), 2 (0,0), 3 (1,); leaves (0,0) and (1,)
    assert buffers.leaves.tolist() == [[0, 1, 2], [0, 3, 3]]
    assert buffers.leaf_depth.tolist() == [2, 1]
    assert buffers.chains == [[0], [0, 1], [0, 1, 2], [0, 3]]


# ---- acceptance -------------------------------------------------------------------------------


def test_greedy_acceptance_counts_the_matching_prefix():
    logits = torch.full((2, 4, 5), -5.0)
    argmax = torch.tensor([[1, 2, 3, 4], [1, 0, 3, 4]])
    logits.scatter_(2, argmax.unsqueeze(-1), 5.0)
    candidates = torch.tensor([[1, 2, 0], [1, 2, 3]])
    n = accepted_lengths(logits, candidates, torch.tensor([3, 3]))
    assert n.tolist() == [2, 1]
    assert accepted_lengths(logits, candidates, torch.tensor([1, 3])).tolist() == [1, 1]


def test_typical_acceptance_thresholds():
    logits = torch.randn(3, 4, 7)
    candidates = torch.randint(0, 7, (3, 3))
    depth = torch.tensor([3, 3, 3])
    never = accepted_lengths(
        logits, candidates, depth, acceptance="typical", epsilon=1e9, delta=1e9
    )
    assert never.tolist() == [0, 0, 0]
    always = accepted_lengths(logits, candidates, depth, acceptance="typical", epsilon=0, delta=0)
    assert always.tolist() == [3, 3, 3]  # every candidate has positive probability


# Typical acceptance by hand: p(candidate) > min(epsilon, delta * exp(-H(p))), p = softmax(logits
# / T). Logits are T * log p, so p is exactly the distribution below when the temperature divides.
#  p                      eps  delta  cand   H        delta*exp(-H)  threshold  accepted
#  .5 .18 .16 .16         0.2  0.5    .18    1.24166  0.14445        0.14445    yes
#      max(...) or exp(+H) make the threshold 0.2: rejected
#  .7 .25 .05             0.2  0.6    .25    0.74603  0.28455        0.2        yes
#      max(...), or delta * exp(-H) alone, make it 0.28455: rejected
#  .7 .25 .05             0.2  0.6    .05    0.74603  0.28455        0.2        no
#  .9 .08 .02             0.1  0.3    .08    0.37512  0.20616        0.1        no
#      without the temperature p is softmax(log p / 2), p(cand) = 0.206: accepted
TYPICAL_BY_HAND = [
    ([0.5, 0.18, 0.16, 0.16], 0.2, 0.5, 1, 0.14445, True),
    ([0.7, 0.25, 0.05], 0.2, 0.6, 1, 0.2, True),
    ([0.7, 0.25, 0.05], 0.2, 0.6, 2, 0.2, False),
    ([0.9, 0.08, 0.02], 0.1, 0.3, 1, 0.1, False),
]


@pytest.mark.parametrize(("p", "epsilon", "delta", "candidate", "threshold", "ok"), TYPICAL_BY_HAND)
def test_typical_acceptance_at_intermediate_thresholds_by_hand(
    p, epsilon, delta, candidate, threshold, ok
):
    temperature = 0.5
    logits = temperature * torch.tensor(p).log()
    options = dict(temperature=temperature, epsilon=epsilon, delta=delta)
    got = candidate_ok(logits, torch.tensor(candidate), "typical", **options)
    assert bool(got) == ok
    # as a path: [root, candidate, candidate] counts 2 accepted, or none
    path = accepted_lengths(
        torch.stack([logits] * 3).unsqueeze(0),
        torch.tensor([[candidate, candidate]]),
        torch.tensor([2]),
        "typical",
        **options,
    )
    assert path.tolist() == [2 if ok else 0]
    logp = (logits / temperature).log_softmax(-1)
    assert float(typical_threshold(logp, epsilon, delta)) == pytest.approx(threshold, abs=1e-5)


# ---- ties between equally long accepted paths ------------------------------------------------


def log_probs(picked: dict[int, float], vocab: int = 8) -> torch.Tensor:
    """Log-probabilities over vocab tokens: picked[token] at its token, the rest shared evenly."""
    p = torch.full((vocab,), (1 - sum(picked.values())) / (vocab - len(picked)))
    for token, prob in picked.items():
        p[token] = prob
    return p.log()


# Three paths of two candidates, every one accepted at epsilon 0.1, delta 0.3 (each p > 0.1):
#   path    nodes  tokens  p(c1)  p(c2)  likelihood
#   (0, 0)  1, 2   1, 4    0.40   0.25   0.100   first in tree order, likeliest first candidate
#   (1, 0)  3, 4   2, 5    0.15   0.80   0.120   likeliest second candidate
#   (2, 0)  5, 6   3, 6    0.30   0.45   0.135   the most likely path: kept
TIE_TREE = [(0,), (0, 0), (1,), (1, 0), (2,), (2, 0)]  # nodes 1 ... 6, depth-first
TIE_TOKENS = [0, 1, 4, 2, 5, 3, 6]  # root, node 1, ..., node 6
TIE_LOGITS = torch.stack(  # the base's logits at each node, which score its children
    [
        log_probs({1: 0.40, 2: 0.15, 3: 0.30}),  # root
        log_probs({4: 0.25}),  # node 1
        log_probs({}),
        log_probs({5: 0.80}),  # node 3
        log_probs({}),
        log_probs({6: 0.45}),  # node 5
        log_probs({}),
    ]
)


@pytest.mark.parametrize("acceptance", ["typical", "greedy"])
def test_ties_go_to_the_most_likely_path_in_both_verifications(acceptance):
    """The tree step (tree_choice on node logits) and the batched step (best_path on each
    leaf's path) keep the same path: under typical acceptance the likeliest of the three equally
    long ones, (2, 0); under greedy acceptance the argmax chain (0, 0), the only one accepted."""
    options = dict(temperature=1.0, epsilon=0.1, delta=0.3)
    heads = SimpleNamespace(heads=[None, None], supports_tree=False)
    plan = plan_steps(heads, TIE_TREE, acceptance, options, False, torch.device("cpu"))
    assert plan.buffers.paths == TIE_TREE
    node, row = (6, 2) if acceptance == "typical" else (2, 0)
    assert tree_choice(plan, TIE_LOGITS, TIE_TOKENS)[0] == node
    leaves = plan.buffers.leaves  # [[0, 1, 2], [0, 3, 4], [0, 5, 6]]
    seqs = torch.tensor(TIE_TOKENS)[leaves]
    got = best_path(TIE_LOGITS[leaves], seqs[:, 1:], plan.buffers.leaf_depth, acceptance, **options)
    assert got == (row, 2)


@torch.no_grad()
def likeliest_path(model, prefix: torch.Tensor, paths, temperature: float):
    """By plain forwards: [root, c1, ...] of the most likely of `paths` (rank tuples) from the
    root prefix[-1] (the first on equal likelihood), and whether it is the first path."""
    h = model.hidden_states(prefix[:-1].unsqueeze(0))[0, -1]
    ranked = model.heads(h.view(1, 1, -1))[:, 0, 0].argsort(-1, descending=True)  # [K, V]
    best, best_ll, first = None, -math.inf, False
    for path in paths:
        tokens = [int(ranked[k, r]) for k, r in enumerate(path)]
        logits = model(torch.cat([prefix, torch.tensor(tokens)]).unsqueeze(0))[0]
        logp = (logits[-len(tokens) - 1 : -1] / temperature).log_softmax(-1)
        ll = float(logp[range(len(tokens)), tokens].sum())
        if ll > best_ll:
            best, best_ll, first = tokens, ll, path == paths[0]
    return [int(prefix[-1]), *best], first


@pytest.mark.parametrize("use_tree_mask", [True, False])
def test_typical_keeps_the_most_likely_of_the_deepest_paths(use_tree_mask):
    """Threshold 0 accepts every path to its full depth: each step keeps the deepest path the
    base finds most likely (recomputed by plain forwards), often not the first in tree order."""
    model = medusa_model("softmax", scramble=1.0, seed=2)
    tree, temperature = default_tree(3, 12), 0.8
    deepest = [p for p in tree if len(p) == max(map(len, tree))]
    prompt = torch.tensor([[3, 1, 4]])
    _, stats = medusa_generate(
        model,
        prompt,
        21,
        acceptance="typical",
        temperature=temperature,
        epsilon=0.0,
        delta=0.0,
        tree=tree,
        use_tree_mask=use_tree_mask,
    )
    sequence, start, firsts = stats.sequence[0], prompt.shape[1], 0
    for kept in stats.accepted:  # each step's root is the token after the last step's path
        expected, first = likeliest_path(model, sequence[: start + 1], deepest, temperature)
        assert sequence[start : start + kept].tolist() == expected, start
        start, firsts = start + kept, firsts + first
    assert firsts < stats.steps  # the rule mattered: some steps kept a later path


def test_greedy_calibration_text_is_the_models_greedy_continuation():
    model = medusa_model("softmax", scramble=0.05)
    windows = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    text = calibration_text(model, windows, "greedy", prompt_len=3)
    assert torch.equal(text, generate(model, windows[:, :3], 9, temperature=0))
    assert calibration_text(model, windows, "typical") is windows
    with pytest.raises(ValueError, match="leaves nothing to continue"):
        calibration_text(model, windows, "greedy", prompt_len=12)


def test_medusa_targets_shift_by_k():
    y = torch.arange(10).view(1, 10)
    assert head_targets(y, 2).tolist() == [[2, 3, 4, 5, 6, 7, 8, 9, -100, -100]]


# ---- decoding -----------------------------------------------------------------------------------


MIXERS = ["softmax", "flash", "linear", "mamba", "sparse", "gau", "gau_chunked"]


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize(("scramble", "new"), [(0.0, 30), (0.05, 17), (1.0, 9)])
@pytest.mark.parametrize("use_tree_mask", [True, False])
def test_greedy_medusa_equals_greedy_decoding(mixer, scramble, new, use_tree_mask):
    model = medusa_model(mixer, scramble=scramble)
    for prompt_len, seed in ((1, 0), (5, 1), (11, 2)):
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=generator)
        expected = generate(model, prompt, new, temperature=0)
        tokens, stats = medusa_generate(
            model, prompt, new, tree=default_tree(3, 12), use_tree_mask=use_tree_mask
        )
        assert torch.equal(tokens, expected), (mixer, prompt_len)
        assert stats.new_tokens == new and sum(stats.accepted) >= new - 1


@pytest.mark.parametrize("embedding", ["rope", "learned"])
def test_tree_node_logits_equal_a_plain_forward_of_their_path(embedding):
    """One tree pass from a cache: node i's logits are those of prefix + path(i), causally."""
    model = medusa_model("softmax", embedding=embedding)
    assert model.supports_tree
    paths = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]
    buffers = tree_buffers(paths, 3)
    prefix = torch.tensor([[4, 7, 1, 9]])
    node_tokens = torch.tensor([5, 2, 8, 3, 11, 6, 0])  # root + one token per path
    caches = model.init_caches(1, 32)
    model(prefix, caches)
    step = TreeStep(positions=4 + buffers.depth, mask=buffers.ancestor_mask())
    logits = model.head(model.hidden_states(node_tokens.unsqueeze(0), caches, tree=step))[0]
    nodes = [(), *buffers.paths]
    for i, path in enumerate(nodes):
        chain = [0] + [nodes.index(path[:d]) for d in range(1, len(path) + 1)]
        full = torch.cat([prefix[0], node_tokens[chain]]).unsqueeze(0)
        torch.testing.assert_close(logits[i], model(full)[0, -1], atol=1e-5, rtol=1e-4)


def test_accepted_prefixes_are_used():
    """Heads copied from the LM head agree with it whenever greedy decoding repeats itself,
    so some steps accept several tokens (the rewind path is exercised)."""
    model = medusa_model("softmax", scramble=0.0)
    prompt = torch.tensor([[3, 3, 3, 3]])
    tokens, stats = medusa_generate(model, prompt, 40, tree=default_tree(3, 12))
    assert max(stats.accepted) > 1 and stats.steps < 39


def _valid(cache):
    """The tensors of a cache that define its state (attention: the filled positions)."""
    if hasattr(cache, "ssm_state"):
        return [cache.conv_state, cache.ssm_state]
    if hasattr(cache, "norm"):
        return [cache.state, cache.norm]
    return [cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]]


@pytest.mark.parametrize(
    ("mixer", "use_tree_mask", "scramble", "seed"),
    [
        ("softmax", True, 0.0, 3),  # accepts top-1 chains: the kept tokens stay in place
        ("softmax", True, 0.05, 1),  # accepts other ranks: the KV cache compacts
        ("softmax", False, 0.0, 3),
        ("linear", False, 0.0, 3),
        ("mamba", False, 0.0, 3),
    ],
)
def test_caches_after_acceptance_equal_plain_decoding_caches(
    mixer, use_tree_mask, scramble, seed, monkeypatch
):
    from lmkit.mixers.softmax import KVCache

    compactions = []
    compact = KVCache.compact
    monkeypatch.setattr(
        KVCache, "compact", lambda self, *a: compactions.append(a) or compact(self, *a)
    )
    model = medusa_model(mixer, scramble=scramble, seed=seed)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    _, stats = medusa_generate(
        model, prompt, 25, tree=default_tree(3, 12), use_tree_mask=use_tree_mask
    )
    assert max(stats.accepted) > 1
    assert bool(compactions) == (scramble > 0)
    length = stats.caches[0].length
    plain = model.init_caches(1, 64)
    for t in range(length):  # one token at a time: how plain decoding fills them
        model(stats.sequence[:, t : t + 1], plain)
    for got, want in zip(stats.caches, plain, strict=True):
        assert got.length == want.length == length
        for a, b in zip(_valid(got), _valid(want), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_typical_with_a_huge_threshold_accepts_only_the_base_token():
    model = medusa_model("softmax", scramble=0.0)
    prompt = torch.tensor([[3, 3, 3, 3]])
    tokens, stats = medusa_generate(
        model, prompt, 20, acceptance="typical", epsilon=1e9, delta=1e9, tree=default_tree(3, 12)
    )
    assert stats.accepted == [1] * stats.steps and stats.steps == 19
    assert torch.equal(tokens, generate(model, prompt, 20, temperature=0))


@pytest.mark.parametrize("use_tree_mask", [True, False])
def test_typical_with_a_zero_threshold_accepts_a_deepest_path(use_tree_mask):
    model = medusa_model("softmax", scramble=1.0)
    tree = default_tree(3, 12)
    _, stats = medusa_generate(
        model,
        torch.tensor([[3, 1, 4]]),
        21,
        acceptance="typical",
        epsilon=0.0,
        delta=0.0,
        tree=tree,
        use_tree_mask=use_tree_mask,
    )
    assert stats.accepted == [max(len(p) for p in tree) + 1] * stats.steps


def test_typical_acceptance_keeps_the_same_tokens_in_both_verification_paths():
    model = medusa_model("softmax", scramble=0.05, seed=1)
    prompt = torch.tensor([[2, 7, 1, 8, 2]])
    options = dict(acceptance="typical", epsilon=0.2, delta=0.5, tree=default_tree(3, 12))
    tree_tokens, tree_stats = medusa_generate(model, prompt, 30, use_tree_mask=True, **options)
    path_tokens, path_stats = medusa_generate(model, prompt, 30, use_tree_mask=False, **options)
    assert torch.equal(tree_tokens, path_tokens) and tree_stats.accepted == path_stats.accepted
    assert max(tree_stats.accepted) > 1


# ---- sampling (typical acceptance) --------------------------------------------------------------


@pytest.mark.parametrize("use_tree_mask", [True, False])
@pytest.mark.parametrize(("top_k", "top_p"), [(None, None), (3, None), (None, 0.6)])
def test_sampled_medusa_accepting_nothing_is_plain_sampling(use_tree_mask, top_k, top_p):
    """Thresholds nothing passes: every step keeps its root and draws the bonus token, so the
    tokens are plain cached sampling's at the same temperature, filters and generator seed."""
    model = medusa_model("softmax", scramble=0.05)
    prompt = torch.tensor([[2, 7, 1]])
    sampling = dict(temperature=0.8, top_k=top_k, top_p=top_p)
    expected = generate(model, prompt, 20, generator=torch.Generator().manual_seed(5), **sampling)
    tokens, stats = medusa_generate(
        model,
        prompt,
        20,
        acceptance="typical",
        epsilon=1e9,
        delta=1e9,
        sample=True,
        generator=torch.Generator().manual_seed(5),
        tree=default_tree(3, 12),
        use_tree_mask=use_tree_mask,
        **sampling,
    )
    assert stats.accepted == [1] * stats.steps
    assert torch.equal(tokens, expected)
    assert not torch.equal(tokens, generate(model, prompt, 20, temperature=0))  # not greedy


def test_sampled_typical_medusa_is_reproducible_per_seed():
    model = medusa_model("softmax", scramble=0.05, seed=1)
    prompt = torch.tensor([[2, 7, 1, 8, 2]])

    def run(seed: int, use_tree_mask: bool = True):
        return medusa_generate(
            model,
            prompt,
            30,
            acceptance="typical",
            temperature=0.8,
            epsilon=0.2,
            delta=0.5,
            sample=True,
            generator=torch.Generator().manual_seed(seed),
            tree=default_tree(3, 12),
            use_tree_mask=use_tree_mask,
        )

    tokens, stats = run(0)
    assert max(stats.accepted) > 1  # candidates are accepted between the draws
    assert torch.equal(run(0)[0], tokens)
    assert torch.equal(run(0, use_tree_mask=False)[0], tokens)  # both verifications draw alike
    assert not torch.equal(run(1)[0], tokens)
    assert not torch.equal(run(2)[0], tokens)


def test_medusa_errors_are_clear():
    plain = build_model(compose_config("run_dir=/tmp/unused"), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="no Medusa heads"):
        medusa_generate(plain, torch.tensor([[1]]), 5)
    model = medusa_model("softmax")
    with pytest.raises(ValueError, match="one prompt"):
        medusa_generate(model, torch.tensor([[1], [2]]), 5)
    one = torch.tensor([[1]])
    with pytest.raises(ValueError, match="sample=True with acceptance='greedy'"):
        medusa_generate(model, one, 5, sample=True)
    with pytest.raises(ValueError, match="pass sample=True"):
        medusa_generate(model, one, 5, acceptance="typical", top_k=5)
    with pytest.raises(ValueError, match="temperature=0: typical acceptance needs"):
        medusa_generate(model, one, 5, acceptance="typical", temperature=0, sample=True)
    with pytest.raises(ValueError, match="top_p=1.5"):
        medusa_generate(model, one, 5, acceptance="typical", sample=True, top_p=1.5)
    bounded = MedusaLM(
        build_model(compose_config("data.block_size=16", "run_dir=/tmp/u"), VOCAB), 2
    )
    with pytest.raises(ValueError, match="exceed the model's 16 positions"):
        medusa_generate(bounded, torch.tensor([[1, 2]]), 20)
