"""Interpolated Kneser-Ney n-gram language model (Chen & Goodman 1998): the baseline of every run.

The training ids are one token stream (for the word tokenizer the end of line is a token, as
``<eos>`` is in the literature). The highest order uses raw counts; every lower order uses
continuation counts N1+(. g), the number of distinct tokens seen immediately before g (an n-gram
seen only at the very start of the stream has none and is unseen at that order). Per order, the
discounts D1, D2, D3+ ("modified") or one D ("single") come from the counts of counts; each
order interpolates with the next lower one, down to the uniform distribution over the
vocabulary, so every token has a nonzero probability:

    p(w | h) = (max(a(hw) - D(a(hw)), 0) + (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) p(w | h')) / a(h.)

with h' = h without its oldest token and a(h.) = sum_x a(hx); an unseen context backs off fully.

N-grams are integer keys without hashing and without overflow for any order and vocabulary: the
k-gram (g, w) is ``rank(g) * V + w``, where rank(g) is the index of its (k-1)-token prefix among
the sorted distinct (k-1)-grams. Sorting the keys sorts the k-grams lexicographically; counting
is a sort per order, scoring a chain of ``np.searchsorted`` lookups per order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmkit.data.corpora import cache_root
from lmkit.evaluation import summarize, word_perplexity

if TYPE_CHECKING:
    from lmkit.data.datamodule import TextDataModule

log = logging.getLogger(__name__)

DISCOUNTS = ("modified", "single")
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback, for degenerate counts of counts
_FORMAT = 1  # bump when the saved arrays or the estimate change; part of the cache fingerprint
_SCORE_CHUNK = 1 << 20  # positions scored at once (bounds the temporary arrays of score)


class KneserNeyLM:
    """Interpolated Kneser-Ney n-gram model over token ids ``0 .. vocab_size - 1``.

    ``discount="modified"``: Chen & Goodman's three discounts D1, D2, D3+ per order;
    ``"single"``: one D = n1 / (n1 + 2 n2) per order (plain interpolated KN). An order whose
    counts of counts give a discount outside (0, k] (toy corpora, the low orders of small
    vocabularies) uses KenLM's fallback 0.5, 1, 1.5 (single: 0.5) and is listed in ``fallback``.
    """

    def __init__(self, order: int, vocab_size: int, discount: str = "modified") -> None:
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ValueError(f"ngram order={order!r} must be a positive integer, e.g. order=5")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer")
        if discount not in DISCOUNTS:
            raise ValueError(f"discount={discount!r} is unknown; choose one of {list(DISCOUNTS)}")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        # per order k (list index k - 1):
        self._keys: list[np.ndarray] = []  # [G_k] int64, sorted keys of the distinct k-grams
        self._counts: list[np.ndarray] = []  # [G_k] int64, adjusted counts a(g) (0: unseen)
        self._total: list[np.ndarray] = []  # [G_{k-1}] float64, a(h.) per context h
        self._backoff: list[np.ndarray] = []  # [G_{k-1}] float64, D1 N1(h.) + D2 N2(h.) + D3 N3+
        self.discounts = np.zeros((order, 3))  # [order, 3]: D1, D2, D3+ of order k in row k - 1
        self.fallback: list[int] = []  # the orders that use FALLBACK_DISCOUNTS

    # ---- fitting ---------------------------------------------------------------------------

    def fit(self, ids: np.ndarray) -> KneserNeyLM:
        """Count the n-grams of a 1-D stream of token ids and estimate the model; returns self."""
        ids = self._check_ids(ids)
        if len(ids) < self.order:
            raise ValueError(
                f"an order-{self.order} model needs at least {self.order} training tokens, got "
                f"{len(ids)}; give more text or a lower order"
            )
        V, N = self.vocab_size, len(ids)
        keys, counts = [], []
        self.fallback = []
        ranks = np.zeros(N, dtype=np.int64)  # rank of the 0-gram (empty prefix) at every start
        for k in range(1, self.order + 1):
            # the k-gram starting at j: (its (k-1)-gram prefix starting at j, token j + k - 1)
            key = ranks[: N - k + 1] * V + ids[k - 1 :]  # [N - k + 1]
            uniq, first, inverse, raw = _unique(key)
            if k > 1:
                # continuation counts of order k - 1: distinct k-grams per (k-1)-token suffix,
                # the suffix of the k-gram starting at j being the (k-1)-gram starting at j + 1
                suffix = ranks[first + 1]
                counts.append(np.bincount(suffix, minlength=len(keys[-1])))
            keys.append(uniq)
            ranks = inverse  # [N - k + 1] rank of the k-gram starting at each position
        counts.append(raw)  # the highest order keeps raw counts
        self._keys, self._counts = keys, [c.astype(np.int64) for c in counts]
        self.discounts = np.array(
            [self._estimate_discounts(k, c) for k, c in enumerate(self._counts, 1)]
        )
        self._context_stats()
        return self

    def _estimate_discounts(self, k: int, counts: np.ndarray) -> tuple[float, float, float]:
        counts_of_counts = tuple(int(np.count_nonzero(counts == j)) for j in (1, 2, 3, 4))
        found = estimate_discounts(counts_of_counts, self.discount)
        if found is not None:
            return found
        log.info(
            "order %d: counts of counts n1..n4 = %s give no valid %s discounts; using %s",
            k,
            counts_of_counts,
            self.discount,
            FALLBACK_DISCOUNTS,
        )
        self.fallback.append(k)
        return FALLBACK_DISCOUNTS if self.discount == "modified" else (FALLBACK_DISCOUNTS[0],) * 3

    def _context_stats(self) -> None:
        """a(h.) and the backoff numerator of every context, from the counts and discounts."""
        self._total, self._backoff = [], []
        for k in range(1, self.order + 1):
            counts = self._counts[k - 1]
            context = self._keys[k - 1] // self.vocab_size  # [G_k] rank of each k-gram's prefix
            size = len(self._keys[k - 2]) if k > 1 else 1
            discount = self._discount_table(k)[np.minimum(counts, 3)]  # [G_k] D(a(g))
            self._total.append(np.bincount(context, weights=counts, minlength=size))
            self._backoff.append(np.bincount(context, weights=discount, minlength=size))

    def _discount_table(self, k: int) -> np.ndarray:
        """D(a) for a = 0, 1, 2, 3+ at order k (indexed by min(a, 3))."""
        return np.concatenate([[0.0], self.discounts[k - 1]])

    # ---- scoring ---------------------------------------------------------------------------

    def score(self, ids: np.ndarray) -> np.ndarray:
        """[N] float64 natural-log probability of every token of a stream given up to order - 1
        previous tokens of the same stream (the first tokens use the shorter history they have).
        """
        self._check_fitted()
        ids = self._check_ids(ids)
        out = np.empty(len(ids))
        history = self.order - 1
        for start in range(0, len(ids), _SCORE_CHUNK):
            lo = max(start - history, 0)  # each chunk brings the history of its first token
            stop = min(start + _SCORE_CHUNK, len(ids))
            piece = ids[lo:stop]
            out[start:stop] = np.log(self._interpolate(self._context_ranks(piece), piece))[
                start - lo :
            ]
        return out

    def perplexity(self, ids: np.ndarray) -> float:
        """exp of the mean negative log probability of every token of a stream."""
        logp = self.score(ids)
        if logp.size == 0:
            raise ValueError("cannot compute the perplexity of an empty stream")
        return float(np.exp(-logp.mean()))

    def distribution(self, context: np.ndarray | list[int] = ()) -> np.ndarray:
        """[V] float64 p(w | context) for every token w; the last order - 1 tokens are used."""
        self._check_fitted()
        context = self._check_ids(np.asarray(context, dtype=np.int64).reshape(-1))
        context = context[max(len(context) - (self.order - 1), 0) :]  # at most order - 1 tokens
        w = np.arange(self.vocab_size)
        ranks = []
        for k in range(1, self.order + 1):
            if k - 1 > len(context):
                rank = -1  # the context is shorter than this order needs
            else:
                rank = 0
                for j, token in enumerate(context[len(context) - (k - 1) :], 1):
                    rank = int(self._lookup(j, np.array([rank]), np.array([token]))[0])
            ranks.append(np.full(self.vocab_size, rank, dtype=np.int64))
        return self._interpolate(ranks, w)

    def _context_ranks(self, ids: np.ndarray) -> list[np.ndarray]:
        """Per order k: [N] rank of the (k-1)-gram before each position, -1 if it is unseen or
        the position has fewer than k - 1 tokens before it."""
        N = len(ids)
        ranks = [np.zeros(N, dtype=np.int64)]  # the empty context
        for k in range(2, self.order + 1):
            rank = np.full(N, -1, dtype=np.int64)
            # the (k-1)-gram ending at i - 1 extends the (k-2)-gram ending at i - 2 by ids[i - 1]
            rank[k - 1 :] = self._lookup(k - 1, ranks[-1][k - 2 : N - 1], ids[k - 2 : N - 1])
            ranks.append(rank)
        return ranks

    def _lookup(self, k: int, context: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Rank of the k-gram (context, w) among the distinct k-grams, -1 where it is unseen."""
        keys = self._keys[k - 1]
        known = context >= 0
        query = np.where(known, context, 0) * self.vocab_size + w
        pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return np.where(known & (keys[pos] == query), pos, -1)

    def _interpolate(self, context_ranks: list[np.ndarray], w: np.ndarray) -> np.ndarray:
        """p(w | context) from the uniform distribution up through every order."""
        p = np.full(len(w), 1.0 / self.vocab_size)
        for k in range(1, self.order + 1):
            context = context_ranks[k - 1]
            safe = np.maximum(context, 0)
            total = np.where(context >= 0, self._total[k - 1][safe], 0.0)
            gram = self._lookup(k, context, w)
            a = np.where(gram >= 0, self._counts[k - 1][np.maximum(gram, 0)], 0)
            discounted = np.maximum(a - self._discount_table(k)[np.minimum(a, 3)], 0.0)
            seen = total > 0  # an unseen context leaves the lower order's p as it is
            p = np.where(
                seen,
                (discounted + self._backoff[k - 1][safe] * p) / np.where(seen, total, 1.0),
                p,
            )
        return p

    # ---- persistence -----------------------------------------------------------------------

    @property
    def num_ngrams(self) -> list[int]:
        """Distinct k-grams of the training stream for k = 1 .. order."""
        return [len(k) for k in self._keys]

    @property
    def nbytes(self) -> int:
        """Memory held by the fitted model's arrays."""
        arrays = self._keys + self._counts + self._total + self._backoff
        return int(sum(a.nbytes for a in arrays))

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted model as plain numpy arrays (what ``save`` writes)."""
        self._check_fitted()
        out = {
            "format": np.array(_FORMAT),
            "order": np.array(self.order),
            "vocab_size": np.array(self.vocab_size),
            "discount": np.array(self.discount),
            "discounts": self.discounts,
            "fallback": np.array(self.fallback, dtype=np.int64),
        }
        for k in range(1, self.order + 1):
            out[f"keys_{k}"] = self._keys[k - 1]
            out[f"counts_{k}"] = self._counts[k - 1]
        return out

    def save(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write the fitted model (and any ``extra`` arrays) to an ``.npz`` file, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **self.arrays(), **extra)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | Path) -> KneserNeyLM:
        """A model written by ``save`` (plain arrays, loaded without pickle)."""
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or int(f["format"]) != _FORMAT:
                raise ValueError(
                    f"{path} is not an n-gram model of format {_FORMAT}; fit and save it again"
                )
            lm = cls(int(f["order"]), int(f["vocab_size"]), str(f["discount"]))
            lm._keys = [f[f"keys_{k}"] for k in range(1, lm.order + 1)]
            lm._counts = [f[f"counts_{k}"] for k in range(1, lm.order + 1)]
            lm.discounts = f["discounts"]
            lm.fallback = [int(k) for k in f["fallback"]]
        lm._context_stats()
        return lm

    # ---- checks ----------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self._keys:
            raise RuntimeError("the n-gram model is not fitted yet; call fit(train_ids) first")

    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"token ids must be a 1-D integer array, got shape {ids.shape} of {ids.dtype}"
            )
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids range over [{ids.min()}, {ids.max()}], outside the vocabulary "
                f"[0, {self.vocab_size}); fit and score with the same tokenizer"
            )
        return ids

    def __repr__(self) -> str:
        return (
            f"KneserNeyLM(order={self.order}, vocab_size={self.vocab_size}, "
            f"discount={self.discount!r}, ngrams={self.num_ngrams})"
        )


def estimate_discounts(
    counts_of_counts: tuple[int, int, int, int], discount: str = "modified"
) -> tuple[float, float, float] | None:
    """D1, D2, D3+ of one order from n1..n4 (the numbers of n-grams with adjusted count 1..4):
    Chen & Goodman's eq. 26 ("modified") or D = n1 / (n1 + 2 n2) for all three ("single").
    None when they are undefined or outside 0 < D_k <= k (D > 0 keeps probability mass for the
    lower orders, so that every token stays possible; D_k <= k keeps discounted counts >= 0).
    """
    n1, n2, n3, n4 = counts_of_counts
    if discount == "single":
        found = (n1 / (n1 + 2 * n2),) * 3 if n1 > 0 else None
    elif discount == "modified":
        found = None
        if min(n1, n2, n3) > 0:
            y = n1 / (n1 + 2 * n2)
            found = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    else:
        raise ValueError(f"discount={discount!r} is unknown; choose one of {list(DISCOUNTS)}")
    if found is None or not all(0 < d <= j for j, d in enumerate(found, 1)):
        return None
    return found


def _unique(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct keys, a position of each, the inverse (rank of every key) and counts."""
    perm = np.argsort(key)
    ordered = key[perm]
    new = np.empty(len(key), dtype=bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    inverse = np.empty(len(key), dtype=np.int64)
    inverse[perm] = np.cumsum(new) - 1
    counts = np.diff(np.append(starts, len(key)))
    return ordered[starts], perm[starts], inverse, counts


# ---- the baseline of a run -----------------------------------------------------------------


def check_baseline_config(order: int, discount: str) -> None:
    """Raise ValueError (one sentence) for an unusable ngram order or discount, before a run."""
    KneserNeyLM(order, 1, discount)


def baseline_metrics(
    datamodule: TextDataModule,
    order: int = 5,
    discount: str = "modified",
    *,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Fit a Kneser-Ney model on the train ids of a data module and score its other splits.

    The tokens scored are those the neural model is scored on (every token of a split after the
    first), through :func:`lmkit.evaluation.summarize`: ``{"val": {"loss", "ppl", "bpb",
    "tokens", "score_s"}, "test": {...}, "order", "discount", "fit_s", ...}``. The fitted model
    and these metrics are cached in ``cache_root()/ngram/<fingerprint>.npz`` (data, tokenizer,
    order, discount); ``use_cache=False`` fits afresh and refreshes the cache.
    """
    check_baseline_config(order, discount)
    datamodule.prepare()
    key = {"tokens": datamodule.meta["fingerprint"], "order": order, "discount": discount}
    key["format"] = _FORMAT
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "ngram" / f"{fingerprint}.npz"
    if use_cache:
        cached = _read_cached_metrics(path)
        if cached is not None:
            return _with_word_ppl({**cached, "cached": True}, datamodule)

    train = np.asarray(datamodule.ids["train"])
    started = time.perf_counter()
    lm = KneserNeyLM(order, datamodule.vocab_size, discount).fit(train)
    metrics: dict[str, Any] = {
        "order": order,
        "discount": discount,
        "fit_s": time.perf_counter() - started,
        "train_tokens": int(train.size),
        "ngrams": lm.num_ngrams,
        "discounts": lm.discounts.round(4).tolist(),
        "fallback": lm.fallback,
        "model_mb": lm.nbytes / 2**20,
    }
    for split in datamodule.split_names:
        if split == "train":
            continue
        started = time.perf_counter()
        logp = lm.score(np.asarray(datamodule.ids[split]))[1:]  # the first token has no target
        seconds = time.perf_counter() - started
        summary = summarize(-float(logp.sum()), logp.size, datamodule.scored_bytes(split))
        metrics[split] = {**summary, "tokens": int(logp.size), "score_s": seconds}
    lm.save(path, metrics=np.array(json.dumps(metrics)))
    return _with_word_ppl({**metrics, "cached": False}, datamodule)


def _with_word_ppl(metrics: dict[str, Any], datamodule) -> dict[str, Any]:
    """Each scored split's perplexity per word (total NLL / words), where the data counts words."""
    counts = datamodule.word_counts() if hasattr(datamodule, "word_counts") else {}
    for split, counts_of in counts.items():
        if isinstance(metrics.get(split), dict):
            nll_sum = metrics[split]["loss"] * metrics[split]["tokens"]
            metrics[split] = {
                **metrics[split],
                "word_ppl": word_perplexity(nll_sum, counts_of["words"]),
            }
    return metrics


def _read_cached_metrics(path: Path) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["metrics"]))
    except (OSError, KeyError, ValueError):
        return None
