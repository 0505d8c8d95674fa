"""Medusa's acceptance rules (Cai et al., 2024): which candidates the base model accepts, how far
along each path, and which of the accepted paths a step keeps.

greedy: a candidate is accepted when it is the base's argmax, so the output is exactly greedy
decoding. typical: when the base gives it probability p > min(epsilon, delta * exp(-H(p))) at
the temperature. The longest accepted path wins; among equally long ones (typical acceptance
only: under greedy acceptance they share their tokens) the most likely, the highest sum of its
accepted candidates' log-probabilities (Medusa's evaluate_posterior), then the first in tree
order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACCEPTANCE = ("greedy", "typical")


def candidate_scores(
    scores: Tensor,
    candidates: Tensor,
    acceptance: str = "greedy",
    *,
    temperature: float = 1.0,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> tuple[Tensor, Tensor]:
    """(ok, logp) of each candidate: scores [..., V] are the base model's logits before it,
    candidates [...] its token. ok: whether the base accepts it on its own (greedy: it is the
    argmax; typical: p(candidate) > min(epsilon, delta * exp(-H(p))), p = softmax(scores /
    temperature)). logp: log p(candidate), which ranks equally long accepted paths (zeros under
    greedy acceptance, where no two different paths are accepted to the same depth)."""
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}; choose one of {list(ACCEPTANCE)}")
    scores = scores.float()
    if acceptance == "greedy":
        ok = candidates == scores.argmax(-1)
        return ok, torch.zeros(ok.shape, device=ok.device)
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: typical acceptance needs temperature > 0")
    logp = F.log_softmax(scores / temperature, dim=-1)
    picked = logp.gather(-1, candidates.unsqueeze(-1)).squeeze(-1)
    return picked.exp() > typical_threshold(logp, epsilon, delta), picked


def typical_threshold(logp: Tensor, epsilon: float, delta: float) -> Tensor:
    """Medusa's typical-acceptance threshold min(epsilon, delta * exp(-H(p))) of each
    distribution, given as log-probabilities logp [..., V]: a confident (low-entropy) base
    demands up to epsilon, an uncertain one less."""
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))


def candidate_ok(scores: Tensor, candidates: Tensor, acceptance: str = "greedy", **options):
    """Whether the base model accepts each candidate on its own (candidate_scores' ok)."""
    return candidate_scores(scores, candidates, acceptance, **options)[0]


def accepted_prefixes(
    logits: Tensor, candidates: Tensor, depth: Tensor, acceptance: str = "greedy", **options
) -> tuple[Tensor, Tensor]:
    """(accepted, logp), each [P, L - 1]: 1 on each path's accepted leading candidates, and
    every candidate's log-probability. logits [P, L, V]: the base's logits at [root, c1, ...,
    c_{L-1}] of each path; candidates [P, L - 1]: c1 ...; depth [P]: the path's real length
    (the rest is padding and never counts)."""
    ok, logp = candidate_scores(logits[:, :-1], candidates, acceptance, **options)
    steps = torch.arange(candidates.shape[1], device=candidates.device)
    ok = ok & (steps < depth.unsqueeze(1))
    return ok.long().cumprod(dim=1), logp


def accepted_lengths(
    logits: Tensor, candidates: Tensor, depth: Tensor, acceptance: str = "greedy", **options
) -> Tensor:
    """How many leading candidates of each path the base model accepts (accepted_prefixes)."""
    return accepted_prefixes(logits, candidates, depth, acceptance, **options)[0].sum(dim=1)


def best_path(
    logits: Tensor, candidates: Tensor, depth: Tensor, acceptance: str = "greedy", **options
) -> tuple[int, int]:
    """(path, accepted length) of the path the base accepts furthest (arguments as in
    accepted_prefixes); among equally long ones the most likely, the highest sum of its accepted
    candidates' log-probabilities, then the first."""
    accepted, logp = accepted_prefixes(logits, candidates, depth, acceptance, **options)
    counts = accepted.sum(dim=1)
    if acceptance == "greedy":  # equally long accepted paths share their tokens: no tie to break
        best = int(counts.argmax())
        return best, int(counts[best])
    likelihood = torch.where(accepted.bool(), logp, 0.0).sum(dim=1)
    likelihood = likelihood.masked_fill(counts < counts.max(), float("-inf"))
    best = int(likelihood.argmax())  # the first of equal maxima
    return best, int(counts[best])


def deepest_accepted(
    ok: list[bool], parent: list[int], depth: list[int], logp: list[float] | None = None
) -> int:
    """The deepest node whose candidate and all its ancestors' are accepted (ok[i - 1] for node
    i; node 0 is the root, parents come before children). Among equally deep ones the most
    likely: the highest sum of logp[j - 1] over the nodes j of its path (None: all alike), then
    the first in tree order."""
    accepted, likelihood, best = [True], [0.0], 0
    for i, good in enumerate(ok, start=1):
        accepted.append(good and accepted[parent[i]])
        likelihood.append(likelihood[parent[i]] + (logp[i - 1] if logp is not None else 0.0))
        if accepted[i] and (depth[i], likelihood[i]) > (depth[best], likelihood[best]):
            best = i
    return best
