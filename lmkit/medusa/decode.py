"""Medusa decoding (Cai et al., 2024): propose a tree of continuations with the heads, verify it
with one forward pass of the base model, accept the longest prefix the base agrees with.

Each step:
1. propose: the root is the last token decided by the base model (not yet in the caches); the
   heads, read at the root's predecessor, give the candidate token of every tree node.
2. verify: one forward pass of the base model. Attention models (every mixer with
   ``supports_tree``) run all N nodes at once under the tree mask (each node sees the cache, its
   ancestors and itself; positions are cache length + depth). Other mixers run every maximal
   path ``[root, c1, ..., cd]`` as one batch from their caches, expanded with ``Cache.select``.
3. accept (accept.py): greedy (candidate == the base's argmax, so the output is exactly greedy
   decoding) or typical (Medusa's rule: p(candidate) > min(epsilon, delta * exp(-entropy))). The
   longest accepted path wins, ties to the most likely. The base's token after it is the bonus
   token and the next root: its argmax, or under typical acceptance with sampling a draw from
   softmax(logits / temperature) (top_k / top_p applied) with a seeded generator.
4. caches keep the accepted path: in a tree step a prefix of the all-top-1 chain is already in
   place (depth-first order), any other path is compacted; a batched step keeps the winning row
   cropped to root + accepted prefix, and caches that cannot go back in time (linear attention,
   Mamba, GAU's running state) are restored from a snapshot and advanced by the kept tokens.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmkit.decoding.sampling import check_sampling_options, generate, sample_next
from lmkit.medusa.accept import best_path, candidate_ok, candidate_scores, deepest_accepted
from lmkit.medusa.tree import TreeBuffers, default_tree, tree_buffers
from lmkit.mixers.base import TreeStep

# ---- one decoding step ------------------------------------------------------------------------


@dataclass
class Sampler:
    """Medusa's sampling under typical acceptance: the root and bonus tokens are drawn from the
    base's softmax(logits / temperature), top_k / top_p applied, with generator."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None


@dataclass
class StepPlan:
    """What every step of one generation reuses: the tree as Python lists (at batch 1 on a CPU
    each tensor op costs about as much as a small model's layer) and its device tensors."""

    buffers: TreeBuffers
    node_heads: list[int]  # the head (0-based) that proposes each non-root node
    node_ranks: list[int]  # the rank of each non-root node's token among its head's top-k
    tree_step: TreeStep | None  # set when the model verifies the whole tree in one pass
    acceptance: str
    options: dict
    device: torch.device
    depth: list[int]  # of every node (root 0)
    parent: list[int]  # of every node (root -1)
    node_depth: Tensor  # depth on the device (tree positions = cache length + depth)
    node_parent: Tensor  # parent of every non-root node, on the device
    leaves: Tensor  # the buffers' leaves and leaf depths, on the device
    leaf_depth: Tensor
    sampler: Sampler | None = None  # None: the root and bonus tokens are the base's argmax


@dataclass
class Accepted:
    """The outcome of one step: the kept tokens (root + accepted candidates), the base's next
    token, and the hidden state the heads read next."""

    kept: list[int]
    bonus: int
    h: Tensor
    caches: list


def plan_steps(
    model, tree, acceptance: str, options: dict, use_tree_mask: bool, device, sampler=None
) -> StepPlan:
    num_heads = len(model.heads)
    buffers = tree_buffers(tree if tree is not None else default_tree(num_heads), num_heads)
    tree_step = None
    if use_tree_mask and model.supports_tree:
        tree_step = TreeStep(
            positions=buffers.depth.to(device), mask=buffers.ancestor_mask().to(device)
        )
    depth = buffers.depth.tolist()
    return StepPlan(
        buffers=buffers,
        node_heads=[d - 1 for d in depth[1:]],
        node_ranks=buffers.rank.tolist()[1:],
        tree_step=tree_step,
        acceptance=acceptance,
        options=options,
        device=device,
        depth=depth,
        parent=buffers.parent.tolist(),
        node_depth=buffers.depth.to(device),
        node_parent=buffers.parent[1:].to(device),
        leaves=buffers.leaves.to(device),
        leaf_depth=buffers.leaf_depth.to(device),
        sampler=sampler,
    )


def next_token(plan: StepPlan, logits: Tensor) -> int:
    """The base's token after logits [V]: its argmax, or a draw of the plan's sampler."""
    if plan.sampler is None:
        return int(logits.argmax(-1))
    s = plan.sampler
    drawn = sample_next(
        logits.unsqueeze(0),
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p,
        generator=s.generator,
    )
    return int(drawn)


def propose(model, plan: StepPlan, h: Tensor, root: int) -> list[int]:
    """The token of every node: the root, then each node's rank among its head's candidates."""
    top = max(plan.node_ranks) + 1
    ranked = model.heads.propose(h).topk(top, dim=-1).indices.tolist()  # [K][top]
    return [root] + [ranked[k][r] for k, r in zip(plan.node_heads, plan.node_ranks, strict=True)]


def verify_tree(model, plan: StepPlan, caches: list, tokens: list[int]) -> Accepted:
    """Attention models: every node in one pass under the tree mask; the caches keep the path."""
    device, length = plan.device, caches[0].length
    plan.tree_step.positions = plan.node_depth + length
    node_tokens = torch.tensor([tokens], device=device)
    hs = model.hidden_states(node_tokens, caches, tree=plan.tree_step)[0]  # [N, D]
    logits = model.head(hs)  # [N, V]
    best, argmax = tree_choice(plan, logits, tokens)
    bonus = argmax[best] if argmax is not None else next_token(plan, logits[best])
    chain = plan.buffers.chains[best]
    in_place = chain == list(range(len(chain)))  # a prefix of the all-top-1 chain
    index = None if in_place else torch.tensor(chain, device=device)
    for cache in caches:
        if in_place:
            cache.crop(length + len(chain))
        else:
            cache.compact(length, index)
    return Accepted([tokens[j] for j in chain], bonus, hs[best], caches)


def tree_choice(plan: StepPlan, logits: Tensor, tokens: list[int]) -> tuple[int, list | None]:
    """(node, argmax): the node a tree step keeps, from the base's logits [N, V] at every node
    (node i's candidate is scored by its parent's): deepest_accepted, ties to the most likely.
    argmax: under greedy acceptance the base's argmax at every node (the bonus token), else None."""
    parent, depth = plan.parent, plan.depth
    if plan.acceptance == "greedy":  # on Python lists: cheaper than tensor ops at batch 1
        argmax = logits.argmax(-1).tolist()
        ok = [tokens[i] == argmax[parent[i]] for i in range(1, len(tokens))]
        return deepest_accepted(ok, parent, depth), argmax
    candidates = torch.tensor(tokens[1:], device=logits.device)
    scores = logits[plan.node_parent]  # node i's candidate is scored by its parent's logits
    ok, logp = candidate_scores(scores, candidates, plan.acceptance, **plan.options)
    return deepest_accepted(ok.tolist(), parent, depth, logp.tolist()), None


def verify_paths(model, plan: StepPlan, caches: list, tokens: list[int]) -> Accepted:
    """Every mixer: the tree's maximal paths as one batch from the (expanded) caches."""
    device, length = plan.device, caches[0].length
    seqs = torch.tensor(tokens, device=device)[plan.leaves]  # [P, max_depth + 1]
    snapshot = [copy.copy(c) for c in caches]  # select() copies; these stay intact
    for cache in caches:
        cache.select(torch.zeros(len(seqs), dtype=torch.long, device=device))
    hs = model.hidden_states(seqs, caches)  # [P, L, D]
    logits = model.head(hs)  # [P, L, V]
    best, a = best_path(logits, seqs[:, 1:], plan.leaf_depth, plan.acceptance, **plan.options)
    kept, bonus = seqs[best, : 1 + a].tolist(), next_token(plan, logits[best, a])
    if rewind(caches, torch.tensor([best], device=device), length + 1 + a):
        return Accepted(kept, bonus, hs[best, a], caches)
    # a recurrent state: back to before verification, advanced by the kept tokens
    h = model.hidden_states(torch.tensor([kept], device=device), snapshot)[0, -1]
    return Accepted(kept, bonus, h, snapshot)


def rewind(caches: list, row: Tensor, keep: int) -> bool:
    """Keep `row` ([1]) of every cache, cropped to `keep` tokens; False when some cache cannot go
    back (the caller then restores the snapshot and replays the accepted tokens)."""
    for cache in caches:
        cache.select(row)
        try:
            cache.crop(keep)
        except ValueError:
            return False
    return True


# ---- generation -------------------------------------------------------------------------------


@dataclass
class MedusaStats:
    """What a Medusa generation did: forward passes (steps) and tokens they produced."""

    steps: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens per step (accepted + bonus)
    seconds: float = 0.0
    sequence: Tensor | None = None  # every decided token, before truncation to max_new_tokens
    caches: list | None = None  # the caches at the end: they hold sequence[:, :cache length]

    @property
    def tokens_per_step(self) -> float:
        return sum(self.accepted) / max(len(self.accepted), 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def check_generation(model, idx: Tensor, max_new_tokens: int, plan: StepPlan) -> None:
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise ValueError(f"Medusa decodes one prompt [1, T>=1] at a time, got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    max_depth = plan.buffers.leaves.shape[1] - 1
    if model.max_len is not None and idx.shape[1] + max_new_tokens + max_depth + 1 > model.max_len:
        raise ValueError(
            f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) + tree depth "
            f"({max_depth + 1}) exceed the model's {model.max_len} positions; shorten them or "
            f"use a model with rope/none positions"
        )


def check_sampling(acceptance: str, options: dict, sample: bool, top_k, top_p, generator) -> None:
    """One clear error for options medusa_generate cannot honour, before any work."""
    candidate_ok(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), acceptance, **options)
    if sample and acceptance != "typical":
        raise ValueError(
            f"sample=True with acceptance={acceptance!r}, which keeps only the base's argmax: "
            f"use acceptance='typical' to sample, or sample=False"
        )
    if not sample and (top_k is not None or top_p is not None or generator is not None):
        raise ValueError(
            "top_k, top_p and generator shape sampled tokens: pass sample=True (with "
            "acceptance='typical') or leave them None"
        )
    check_sampling_options(0, options["temperature"], top_k, top_p)


@torch.no_grad()
def medusa_generate(
    model,
    idx: Tensor,
    max_new_tokens: int,
    *,
    tree: list[tuple[int, ...]] | None = None,
    acceptance: str = "greedy",
    temperature: float = 1.0,
    epsilon: float = 0.09,
    delta: float = 0.3,
    sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_tree_mask: bool = True,
) -> tuple[Tensor, MedusaStats]:
    """Continue idx [1, T0] by max_new_tokens tokens with Medusa -> ([1, T0 + new], stats).

    model is a MedusaLM. With acceptance="greedy" the tokens equal plain greedy decoding
    exactly, whatever the heads predict. acceptance="typical" accepts a candidate of probability
    p > min(epsilon, delta * exp(-H)) under the base's softmax(logits / temperature); the root
    and bonus tokens are the base's argmax, or with sample=True (Medusa's sampling) draws from
    that distribution after top_k / top_p, with generator: the same generator state gives the
    same tokens. Attention models verify the whole tree in one pass under a tree mask
    (use_tree_mask=False verifies the paths as a batch, which every mixer supports). Positions
    must fit: prompt + max_new_tokens + tree depth + 1 <= model.max_len.
    """
    if getattr(model, "heads", None) is None:
        raise ValueError(
            "this model has no Medusa heads; train them with "
            "scripts/train.py experiment=medusa init_from=<checkpoint>"
        )
    options = dict(temperature=temperature, epsilon=epsilon, delta=delta)
    check_sampling(acceptance, options, sample, top_k, top_p, generator)
    sampler = Sampler(temperature, top_k, top_p, generator) if sample else None
    plan = plan_steps(model, tree, acceptance, options, use_tree_mask, idx.device, sampler)
    check_generation(model, idx, max_new_tokens, plan)
    was_training = model.training
    model.eval()
    try:
        return decode_steps(model, plan, idx, max_new_tokens)
    finally:
        model.train(was_training)


def decode_steps(model, plan: StepPlan, idx: Tensor, max_new_tokens: int):
    """medusa_generate's loop: prefill, then propose / verify until max_new_tokens are decided."""
    stats, started = MedusaStats(), time.perf_counter()
    dtype = next(model.parameters()).dtype
    context = idx.shape[1] + max_new_tokens + plan.buffers.num_nodes + 1
    caches = model.init_caches(1, context, device=idx.device, dtype=dtype)
    h = model.hidden_states(idx, caches)[0, -1]  # [D]
    out = [next_token(plan, model.head(h))]
    verify = verify_tree if plan.tree_step is not None else verify_paths
    while len(out) < max_new_tokens:
        step = verify(model, plan, caches, propose(model, plan, h, out[-1]))
        out += step.kept[1:] + [step.bonus]
        h, caches = step.h, step.caches
        stats.steps += 1
        stats.accepted.append(len(step.kept))
    sequence = torch.cat([idx[0], torch.tensor(out, dtype=idx.dtype, device=idx.device)])
    tokens = sequence[: idx.shape[1] + max_new_tokens]
    stats.new_tokens = len(tokens) - idx.shape[1]
    stats.sequence, stats.caches = sequence.unsqueeze(0), caches
    stats.seconds = time.perf_counter() - started
    return tokens.unsqueeze(0), stats


def timed_greedy(model, idx: Tensor, max_new_tokens: int) -> tuple[Tensor, float]:
    """Plain cached greedy decoding (lmkit.decoding.sampling.generate at temperature 0), the
    reference Medusa must equal and the baseline of its speedup -> (tokens, seconds)."""
    started = time.perf_counter()
    tokens = generate(model, idx, max_new_tokens, temperature=0)
    return tokens, time.perf_counter() - started


def speedup_report(model, prompts: list[Tensor], max_new_tokens: int, **medusa_options) -> dict:
    """Medusa vs cached greedy decoding on the same prompts: tokens per step, tokens/s of both,
    speedup, and whether the outputs agree token for token."""
    medusa_s = greedy_s = 0.0
    accepted: list[int] = []
    same = 0
    for prompt in prompts:
        m_tokens, stats = medusa_generate(model, prompt, max_new_tokens, **medusa_options)
        g_tokens, seconds = timed_greedy(model, prompt, max_new_tokens)
        medusa_s, greedy_s = medusa_s + stats.seconds, greedy_s + seconds
        accepted += stats.accepted
        same += int(torch.equal(m_tokens, g_tokens))
    total = len(prompts) * max_new_tokens
    return {
        "tokens_per_step": sum(accepted) / max(len(accepted), 1),
        "medusa_tokens_per_s": total / medusa_s,
        "greedy_tokens_per_s": total / greedy_s,
        "speedup": greedy_s / medusa_s,
        "identical_outputs": f"{same}/{len(prompts)}",
        "prompts": len(prompts),
        "new_tokens": max_new_tokens,
    }
