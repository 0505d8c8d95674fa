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
4. Caches: a tree step compacts the KV cache to the accepted path. A batched step keeps the
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

from lmkit.mixers.base import TreeStep

ACCEPTANCE = ("greedy", "typical")


# ---- trees ------------------------------------------------------------------------------------


def check_tree(paths: list[tuple[int, ...]], num_heads: int) -> list[tuple[int, ...]]:
    """The paths as sorted tuples; a clear error unless non-empty, prefix-closed and within the
    heads (depth <= num_heads)."""
    paths = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
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


@dataclass
class TreeBuffers:
    """Index tensors of a tree. Nodes: 0 is the root, node i + 1 is paths[i]."""

    paths: list[tuple[int, ...]]
    depth: Tensor  # [N] depth of each node (root 0)
    parent: Tensor  # [N] parent node index (root: -1)
    rank: Tensor  # [N] rank of the node's token among its head's candidates (root: 0)
    leaves: Tensor  # [P, max_depth + 1] node indices root -> leaf, padded by repeating the leaf
    leaf_depth: Tensor  # [P] depth of each leaf

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    def ancestor_mask(self) -> Tensor:
        """[N, N] boolean: node i may see node j iff j is i or an ancestor of i (the tree
        attention mask; a chain gives the causal mask)."""
        n = self.num_nodes
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            j = int(self.parent[i])
            while j >= 0:
                mask[i, j] = True
                j = int(self.parent[j])
        return mask


def tree_buffers(paths: list[tuple[int, ...]], num_heads: int) -> TreeBuffers:
    paths = check_tree(paths, num_heads)
    index = {p: i + 1 for i, p in enumerate(paths)}
    depth = [0] + [len(p) for p in paths]
    parent = [-1] + [index.get(p[:-1], 0) for p in paths]
    rank = [0] + [p[-1] for p in paths]
    is_parent = {p[:-1] for p in paths}
    leaves = [p for p in paths if p not in is_parent]
    max_depth = max(len(p) for p in leaves)
    rows = []
    for leaf in leaves:
        nodes = [0] + [index[leaf[:d]] for d in range(1, len(leaf) + 1)]
        rows.append(nodes + [nodes[-1]] * (max_depth + 1 - len(nodes)))
    return TreeBuffers(
        paths=paths,
        depth=torch.tensor(depth),
        parent=torch.tensor(parent),
        rank=torch.tensor(rank),
        leaves=torch.tensor(rows),
        leaf_depth=torch.tensor([len(p) for p in leaves]),
    )


# ---- acceptance -------------------------------------------------------------------------------


def accepted_lengths(
    logits: Tensor,
    candidates: Tensor,
    depth: Tensor,
    *,
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
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}; choose one of {list(ACCEPTANCE)}")
    scores = logits[:, :-1].float()  # [P, L - 1, V]
    if acceptance == "greedy":
        ok = candidates == scores.argmax(-1)
    else:
        if temperature <= 0:
            raise ValueError("typical acceptance needs temperature > 0")
        logp = F.log_softmax(scores / temperature, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)  # [P, L - 1]
        threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
        ok = logp.gather(-1, candidates.unsqueeze(-1)).squeeze(-1).exp() > threshold
    steps = torch.arange(candidates.shape[1], device=candidates.device)
    ok = ok & (steps < depth.unsqueeze(1))  # padding never counts
    return ok.long().cumprod(dim=1).sum(dim=1)


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
    was_training = model.training
    model.eval()
    device, dtype = idx.device, next(model.parameters()).dtype
    leaves, leaf_depth = buffers.leaves.to(device), buffers.leaf_depth.to(device)
    node_depth, node_rank = buffers.depth.to(device), buffers.rank.to(device)
    top = int(node_rank.max()) + 1
    stats = MedusaStats()
    started = time.perf_counter()

    propose = _proposer(model.medusa)
    # tree verification writes every node to the caches before compacting to the kept path
    tree_step = None
    if use_tree_mask and model.supports_tree:
        tree_step = TreeStep(positions=node_depth, mask=buffers.ancestor_mask().to(device))
    context = idx.shape[1] + max_new_tokens + buffers.num_nodes + 1
    caches = model.init_caches(1, context, device=device, dtype=dtype)
    h = model.hidden_states(idx, caches)[:, -1:]  # [1, 1, D]
    root = model.head(h)[:, -1].argmax(-1)  # [1]
    out = [root]
    produced = 1
    while produced < max_new_tokens:
        # candidates of every node from the heads at the root's predecessor
        ranked = propose(h.view(-1)).topk(top, dim=-1).indices  # [K, top]
        tokens = ranked[(node_depth - 1).clamp(min=0), node_rank]  # [N]
        tokens[0] = root[0]
        seqs = tokens[leaves]  # [P, max_depth + 1]
        length = caches[0].length
        if tree_step is not None:  # attention: all nodes in one pass under the tree mask
            tree_step.positions = length + node_depth
            hs = model.hidden_states(tokens.unsqueeze(0), caches, tree=tree_step)[0]  # [N, D]
            logits = model.head(hs)[leaves]  # [P, L, V], each leaf's path root -> leaf
        else:  # every mixer: the leaves' paths as a batch from the (expanded) caches
            snapshot = [copy.copy(c) for c in caches]  # select() copies; these stay intact
            for cache in caches:
                cache.select(torch.zeros(len(seqs), dtype=torch.long, device=device))
            hs = model.hidden_states(seqs, caches)  # [P, L, D]
            logits = model.head(hs)  # [P, L, V]
        accepted = accepted_lengths(
            logits,
            seqs[:, 1:],
            leaf_depth,
            acceptance=acceptance,
            temperature=temperature,
            epsilon=epsilon,
            delta=delta,
        )
        best = int(accepted.argmax())  # the longest; ties go to the first (shallowest) leaf
        a = int(accepted[best])
        kept = seqs[best, : 1 + a]  # root + accepted candidates, now part of the sequence
        bonus = logits[best, a].argmax(-1, keepdim=True)  # the base model's next token
        if tree_step is not None:
            for cache in caches:
                cache.compact(length, leaves[best, : 1 + a])
            h = hs[leaves[best, a]].view(1, 1, -1)
        elif _rewind(caches, accepted.argmax().view(1), length + 1 + a):
            h = hs[best : best + 1, a : a + 1]
        else:  # a recurrent state: back to before verification, then advance by the kept tokens
            caches = snapshot
            h = model.hidden_states(kept.unsqueeze(0), caches)[:, -1:]
        new = torch.cat([kept[1:], bonus])[: max_new_tokens - produced]
        out.append(new)
        produced += len(new)
        root = bonus
        stats.steps += 1
        stats.accepted.append(a + 1)
    sequence = torch.cat([idx[0], *out])
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
