"""Medusa's candidate trees: a tree is a list of paths; a path is a tuple of per-depth ranks
(``(0, 1)`` is head 1's top token followed by head 2's second-best token). Trees are
prefix-closed and kept in depth-first order. Sparse trees are built best-first from the heads'
measured top-k hit rates (calibration)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmkit.decoding.sampling import greedy_continuations


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
    for k, logits in enumerate(model.heads(h), start=1):
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
