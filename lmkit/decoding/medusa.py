"""Medusa decoding (Cai et al., 2024): propose a tree of continuations with the Medusa heads,
verify it with one forward pass of the base model, keep the longest accepted prefix.

A tree is a list of paths; a path is a tuple of per-depth ranks: ``(0, 1)`` is head 1's top
token followed by head 2's second-best token. Trees are prefix-closed (every prefix of a path
is a path). Each step:

1. The root is the last token decided by the base model (not yet in the caches). The heads,
   read at the root's predecessor, propose the candidates of every node.
2. Verification, one forward pass of the base model. Attention models (every mixer with
   ``supports_tree``) run all N nodes at once under the tree mask (each node sees the cache, its
   ancestors and itself; positions are cache length + depth). Other mixers run every maximal
   path (leaf) ``[root, c1, ..., cd]`` as one batch from their caches, expanded over the leaves
   with ``Cache.select``.
3. Acceptance: greedy (candidate == the base model's argmax, so the output is exactly greedy
   decoding) or typical (Medusa's rule: p(candidate) > min(epsilon, delta * exp(-entropy))).
   The leaf with the longest accepted prefix wins; the base model's argmax after it is the
   bonus token and the next root.
4. Caches: a tree step keeps the accepted path in the KV cache: nodes are in depth-first order,
   so a prefix of the all-top-1 chain is already in place and the cache only shortens; any
   other path is compacted. A batched step keeps the
   winning row, cropped to root + accepted prefix; caches that cannot go back in time (linear
   attention, Mamba, GAU's running state) are restored from the snapshot taken before
   verification and advanced by the accepted tokens.
"""

from __future__ import annotations

import copy
import heapq
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from lmkit.decoding.sampling import greedy_continuations
from lmkit.mixers.base import TreeStep

ACCEPTANCE = ("greedy", "typical")


# ---- trees ------------------------------------------------------------------------------------


def check_tree(paths: list[tuple[int, ...]], num_heads: int) -> list[tuple[int, ...]]:
    """The paths as tuples in depth-first order (each parent before its children, the all-top-1
    chain (0,), (0, 0), ... first); a clear error unless non-empty, prefix-closed and within the
    heads (depth <= num_heads)."""
    paths = sorted({tuple(int(r) for r in p) for p in paths})
    if not paths:
        raise ValueError("a Medusa tree needs at least one path, e.g. [[0]]")
    for p in paths:
        if not p or min(p) < 0:
            raise ValueError(f"tree path {list(p)} must be a non-empty list of ranks >= 0")
        if len(p) > num_heads:
            raise ValueError(f"tree path {list(p)} is deeper than the {num_heads} Medusa heads")
        if len(p) > 1 and p[:-1] not in set(paths):
            raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
    return paths


def tree_from_accuracies(accuracy: list[list[float]], num_nodes: int) -> list[tuple[int, ...]]:
    """The num_nodes paths of highest expected acceptance, best-first: a path's score is the
    product over depths of accuracy[depth][rank] (head depth+1's top-(rank+1) hit rate on
    calibration data, Medusa's sparse-tree construction). Scores shrink along a path, so the
    result is prefix-closed."""
    heap = [(-accuracy[0][r], (r,)) for r in range(len(accuracy[0]))]
    heapq.heapify(heap)
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < num_nodes:
        neg_score, path = heapq.heappop(heap)
        paths.append(path)
        depth = len(path)
        if depth < len(accuracy):
            for r, acc in enumerate(accuracy[depth]):
                heapq.heappush(heap, (neg_score * acc, (*path, r)))
    return check_tree(paths, len(accuracy))


def default_tree(num_heads: int, num_nodes: int = 24, top_k: int = 4) -> list[tuple[int, ...]]:
    """A sparse tree for uncalibrated heads: assumes head k's rank-r hit rate falls as
    0.6 * 0.85^(k-1) * 0.5^r. Prefer `calibrate_tree` on real text."""
    accuracy = [[0.6 * 0.85**k * 0.5**r for r in range(top_k)] for k in range(num_heads)]
    return tree_from_accuracies(accuracy, num_nodes)


@torch.no_grad()
def head_rank_accuracy(model, ids: Tensor, top_k: int = 8) -> list[list[float]]:
    """accuracy[k][r]: how often head k+1's rank-r token is the true token, over ids [B, T]
    (the calibration data of tree_from_accuracies)."""
    model.eval()
    h = model.hidden_states(ids)
    accuracy = []
    for k, logits in enumerate(model.medusa(h), start=1):
        targets = ids[:, k + 1 :]  # head k at position t predicts token t + k + 1
        ranks = logits[:, : ids.shape[1] - k - 1].topk(top_k, dim=-1).indices  # [B, T', top_k]
        hits = (ranks == targets.unsqueeze(-1)).float().flatten(0, 1).mean(0)
        accuracy.append(hits.tolist())
    return accuracy


def calibration_windows(datamodule, count: int) -> Tensor:
    """The first `count` windows [count, T] of the val split (train when there is none): text
    to fit a tree on and to draw prompts from."""
    split = "val" if "val" in datamodule.split_names else "train"
    batches, rows = [], 0
    for x, _ in datamodule.eval_dataloader(split):
        batches.append(x)
        rows += len(x)
        if rows >= count:
            break
    windows = torch.cat(batches)
    if len(windows) < count:
        raise ValueError(f"the {split} split has only {len(windows)} windows; {count} are needed")
    return windows[:count]


def calibrate_tree(model, ids: Tensor, num_nodes: int = 24, top_k: int = 4):
    """tree_from_accuracies on the heads' measured hit rates over ids [B, T]."""
    return tree_from_accuracies(head_rank_accuracy(model, ids, top_k), num_nodes)


def calibration_text(model, windows: Tensor, acceptance: str, prompt_len: int = 8) -> Tensor:
    """The text to fit a tree on: for greedy acceptance the model's own greedy continuations of
    the windows' first prompt_len tokens (a candidate is kept only when it equals the base
    model's argmax, so the heads' hit rates on real text mislead), else the windows."""
    if acceptance != "greedy":
        return windows
    return greedy_continuations(model, windows, prompt_len)


@dataclass
class TreeBuffers:
    """Index tensors of a tree. Nodes: 0 is the root, node i + 1 is paths[i]."""

    paths: list[tuple[int, ...]]
    depth: Tensor  # [N] depth of each node (root 0)
    parent: Tensor  # [N] parent node index (root: -1)
    rank: Tensor  # [N] rank of the node's token among its head's candidates (root: 0)
    leaves: Tensor  # [P, max_depth + 1] node indices root -> leaf, padded by repeating the leaf
    leaf_depth: Tensor  # [P] depth of each leaf
    chains: list[list[int]] = field(default_factory=list)  # per node: its nodes root -> it

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    def ancestor_mask(self) -> Tensor:
        """[N, N] boolean: node i may see node j iff j is i or an ancestor of i (the tree
        attention mask; a chain gives the causal mask)."""
        mask = torch.zeros(self.num_nodes, self.num_nodes, dtype=torch.bool)
        for i, chain in enumerate(self.chains):
            mask[i, chain] = True
        return mask


def tree_buffers(paths: list[tuple[int, ...]], num_heads: int) -> TreeBuffers:
    paths = check_tree(paths, num_heads)
    index = {p: i + 1 for i, p in enumerate(paths)}
    depth = [0] + [len(p) for p in paths]
    parent = [-1] + [index.get(p[:-1], 0) for p in paths]
    rank = [0] + [p[-1] for p in paths]
    chains = [[0]] + [[0] + [index[p[:d]] for d in range(1, len(p) + 1)] for p in paths]
    is_parent = {p[:-1] for p in paths}
    leaves = [index[p] for p in paths if p not in is_parent]
    max_depth = max(depth[leaf] for leaf in leaves)
    rows = [chains[leaf] + [leaf] * (max_depth - depth[leaf]) for leaf in leaves]
    return TreeBuffers(
        paths=paths,
        depth=torch.tensor(depth),
        parent=torch.tensor(parent),
        rank=torch.tensor(rank),
        leaves=torch.tensor(rows),
        leaf_depth=torch.tensor([depth[leaf] for leaf in leaves]),
        chains=chains,
    )


# ---- acceptance -------------------------------------------------------------------------------


def accepted_lengths(
    logits: Tensor,
    candidates: Tensor,
    depth: Tensor,
    acceptance: str = "greedy",
    temperature: float = 1.0,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> Tensor:
    """How many leading candidates of each path the base model accepts.

    logits [P, L, V]: the base model's logits at [root, c1, ..., c_{L-1}] of each path;
    candidates [P, L - 1]: c1 ... ; depth [P]: the path's real length (the rest is padding).
    greedy: c_{i+1} == argmax(logits[:, i]). typical: p(c_{i+1}) > min(epsilon,
    delta * exp(-H(p))), p = softmax(logits[:, i] / temperature).
    """
    options = dict(temperature=temperature, epsilon=epsilon, delta=delta)
    ok = candidate_ok(logits[:, :-1], candidates, acceptance, **options)  # [P, L - 1]
    steps = torch.arange(candidates.shape[1], device=candidates.device)
    ok = ok & (steps < depth.unsqueeze(1))  # padding never counts
    return ok.long().cumprod(dim=1).sum(dim=1)


def candidate_ok(
    scores: Tensor,
    candidates: Tensor,
    acceptance: str = "greedy",
    *,
    temperature: float = 1.0,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> Tensor:
    """Whether the base model accepts each candidate, on its own: scores [..., V] are the base
    model's logits before the candidate, candidates [...] its token (the rules of
    accepted_lengths)."""
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}; choose one of {list(ACCEPTANCE)}")
    scores = scores.float()
    if acceptance == "greedy":
        return candidates == scores.argmax(-1)
    if temperature <= 0:
        raise ValueError("typical acceptance needs temperature > 0")
    logp = F.log_softmax(scores / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    return logp.gather(-1, candidates.unsqueeze(-1)).squeeze(-1).exp() > threshold


# ---- decoding ---------------------------------------------------------------------------------


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


def _rewind(caches: list, row: Tensor, keep: int) -> bool:
    """Keep `row` ([1]) of every cache, cropped to `keep` tokens; False when some cache cannot go
    back (the caller then restores the snapshot and replays the accepted tokens)."""
    for cache in caches:
        cache.select(row)
        try:
            cache.crop(keep)
        except ValueError:
            return False
    return True


def _proposer(medusa):
    """All K heads on one hidden state [D] -> logits [K, V] as two batched products (the same
    numbers as MedusaHeads.forward, with a fraction of its per-op overhead at batch 1)."""
    w1 = torch.stack([head.block.weight for head in medusa.heads])  # [K, D, D]
    b1 = torch.stack([head.block.bias for head in medusa.heads])  # [K, D]
    w2 = torch.stack([head.proj.weight for head in medusa.heads])  # [K, V, D]

    def propose(h: Tensor) -> Tensor:
        x = h.to(w1.dtype)
        y = x + F.silu(
            torch.baddbmm(b1.unsqueeze(-1), w1, x.expand(len(w1), -1).unsqueeze(-1)).squeeze(-1)
        )  # [K, D]
        return torch.bmm(w2, y.unsqueeze(-1)).squeeze(-1)  # [K, V]

    return propose


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
    use_tree_mask: bool = True,
) -> tuple[Tensor, MedusaStats]:
    """Continue idx [1, T0] by max_new_tokens tokens with Medusa -> ([1, T0 + new], stats).

    With acceptance="greedy" the tokens equal plain greedy decoding exactly, whatever the heads
    predict. The model needs Medusa heads (model.medusa) and unbounded positions or enough room:
    prompt + max_new_tokens + tree depth + 1 <= model.max_len. Attention models verify the whole
    tree in one pass under a tree mask (use_tree_mask=False verifies the leaves as a batch, the
    path every mixer supports).
    """
    if getattr(model, "medusa", None) is None:
        raise ValueError(
            "this model has no Medusa heads; train them with "
            "scripts/train.py experiment=medusa base_ckpt=<checkpoint>"
        )
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
        raise ValueError(f"Medusa decodes one prompt [1, T>=1] at a time, got {tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    num_heads = len(model.medusa)
    buffers = tree_buffers(tree if tree is not None else default_tree(num_heads), num_heads)
    max_depth = buffers.leaves.shape[1] - 1
    if model.max_len is not None and idx.shape[1] + max_new_tokens + max_depth + 1 > model.max_len:
        raise ValueError(
            f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) + tree depth "
            f"({max_depth + 1}) exceed the model's {model.max_len} positions; shorten them or "
            f"use a model with rope/none positions"
        )
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}; choose one of {list(ACCEPTANCE)}")
    if acceptance == "typical" and temperature <= 0:
        raise ValueError("typical acceptance needs temperature > 0")
    options = dict(temperature=temperature, epsilon=epsilon, delta=delta)
    was_training = model.training
    model.eval()
    device, dtype = idx.device, next(model.parameters()).dtype
    # the per-node bookkeeping runs on Python lists: at batch 1 on a CPU each tensor op costs
    # about as much as a layer of a small model, and a step needs the few results as ints anyway
    depth, parent, chains = buffers.depth.tolist(), buffers.parent.tolist(), buffers.chains
    node_heads = [d - 1 for d in depth[1:]]
    node_ranks = buffers.rank.tolist()[1:]
    top = max(node_ranks) + 1
    leaves, leaf_depth = buffers.leaves.to(device), buffers.leaf_depth.to(device)
    stats = MedusaStats()
    started = time.perf_counter()

    propose = _proposer(model.medusa)
    # tree verification writes every node to the caches before compacting to the kept path
    tree_step = None
    if use_tree_mask and model.supports_tree:
        node_depth = buffers.depth.to(device)
        parent_index = buffers.parent[1:].to(device)
        chain_index = [torch.tensor(chain, device=device) for chain in chains]
        # depth-first node order puts the all-top-1 chain first: accepting a prefix of it leaves
        # the kept tokens in place, so the caches only shorten
        in_place = [chain == list(range(len(chain))) for chain in chains]
        tree_step = TreeStep(positions=node_depth, mask=buffers.ancestor_mask().to(device))
    context = idx.shape[1] + max_new_tokens + buffers.num_nodes + 1
    caches = model.init_caches(1, context, device=device, dtype=dtype)
    h = model.hidden_states(idx, caches)[0, -1]  # [D]
    root = int(model.head(h).argmax(-1))
    out = [root]
    while len(out) < max_new_tokens:
        # candidates of every node from the heads at the root's predecessor
        ranked = propose(h).topk(top, dim=-1).indices.tolist()  # [K][top]
        tokens = [root] + [ranked[k][r] for k, r in zip(node_heads, node_ranks, strict=True)]
        length = caches[0].length
        if tree_step is not None:  # attention: all nodes in one pass under the tree mask
            tree_step.positions = node_depth + length
            node_tokens = torch.tensor([tokens], device=device)
            hs = model.hidden_states(node_tokens, caches, tree=tree_step)[0]  # [N, D]
            logits = model.head(hs)  # [N, V]
            argmax = logits.argmax(-1).tolist()
            if acceptance == "greedy":
                ok = [tokens[i] == argmax[parent[i]] for i in range(1, len(tokens))]
            else:
                ok = candidate_ok(
                    logits[parent_index], node_tokens[0, 1:], acceptance, **options
                ).tolist()
            # a node counts when it and all its ancestors are accepted (parents come first);
            # the deepest wins, ties (typical only) to the first: the better-ranked candidates
            accepted, best = [True], 0
            for i, good in enumerate(ok, start=1):
                accepted.append(good and accepted[parent[i]])
                if accepted[i] and depth[i] > depth[best]:
                    best = i
            a = depth[best]
            kept = [tokens[j] for j in chains[best]]  # root + accepted candidates
            bonus = argmax[best]  # the base model's next token
            for cache in caches:
                if in_place[best]:
                    cache.crop(length + 1 + a)
                else:
                    cache.compact(length, chain_index[best])
            h = hs[best]
        else:  # every mixer: the leaves' paths as a batch from the (expanded) caches
            seqs = torch.tensor(tokens, device=device)[leaves]  # [P, max_depth + 1]
            snapshot = [copy.copy(c) for c in caches]  # select() copies; these stay intact
            for cache in caches:
                cache.select(torch.zeros(len(seqs), dtype=torch.long, device=device))
            hs = model.hidden_states(seqs, caches)  # [P, L, D]
            logits = model.head(hs)  # [P, L, V]
            counts = accepted_lengths(logits, seqs[:, 1:], leaf_depth, acceptance, **options)
            best = int(counts.argmax())  # the longest; ties go to the first leaf
            a = int(counts[best])
            kept = seqs[best, : 1 + a].tolist()
            bonus = int(logits[best, a].argmax(-1))
            if _rewind(caches, torch.tensor([best], device=device), length + 1 + a):
                h = hs[best, a]
            else:  # a recurrent state: back to before verification, advance by the kept tokens
                caches = snapshot
                kept_ids = torch.tensor([kept], device=device)
                h = model.hidden_states(kept_ids, caches)[0, -1]
        out += kept[1:] + [bonus]
        root = bonus
        stats.steps += 1
        stats.accepted.append(a + 1)
    sequence = torch.cat([idx[0], torch.tensor(out, dtype=idx.dtype, device=device)])
    tokens = sequence[: idx.shape[1] + max_new_tokens]
    stats.new_tokens = len(tokens) - idx.shape[1]
    stats.sequence, stats.caches = sequence.unsqueeze(0), caches
    stats.seconds = time.perf_counter() - started
    model.train(was_training)
    return tokens.unsqueeze(0), stats


def timed_greedy(model, idx: Tensor, max_new_tokens: int) -> tuple[Tensor, float]:
    """Plain cached greedy decoding (lmkit.decoding.sampling.generate at temperature 0), the
    reference Medusa must equal and the baseline of its speedup -> (tokens, seconds)."""
    from lmkit.decoding.sampling import generate

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
