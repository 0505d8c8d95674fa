"""The Kneser-Ney baseline: hand-computed probabilities, normalisation, a dictionary reference,
real-text behaviour, persistence and the cached baseline of a run."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from lmkit.data.corpora import cache_root
from lmkit.data.datamodule import TextDataModule
from lmkit.ngram import KneserNeyLM, baseline_metrics, estimate_discounts

# a b a b c a b c a over the vocabulary a=0, b=1, c=2, d=3 (d never occurs)
TOY = [0, 1, 0, 1, 2, 0, 1, 2, 0]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> TextDataModule:
    dm = TextDataModule("tinyshakespeare", block_size=64, batch_size=4)
    dm.prepare()
    return dm


def zipf_stream(rng: np.random.Generator, n: int, vocab_size: int) -> np.ndarray:
    """Tokens with a Zipfian unigram and some local structure, so higher orders see repeats."""
    p = 1.0 / np.arange(1, vocab_size + 1)
    ids = rng.choice(vocab_size, size=n, p=p / p.sum())
    repeat = rng.random(n) < 0.3
    ids[2:][repeat[2:]] = ids[:-2][repeat[2:]]  # copy the token two back now and then
    return ids


# ---- hand-computed ---------------------------------------------------------------------------


def test_discounts_of_the_algorithms_reference():
    # Y = 1000 / (1000 + 2 * 400) = 5/9; D1 = 1 - 2 Y 400/1000 = 5/9;
    # D2 = 2 - 3 Y 200/400 = 7/6; D3+ = 3 - 4 Y 120/200 = 5/3
    assert estimate_discounts((1000, 400, 200, 120), "modified") == pytest.approx(
        (5 / 9, 7 / 6, 5 / 3), abs=1e-12
    )
    # single: D = n1 / (n1 + 2 n2) = 1000 / 1800
    assert estimate_discounts((1000, 400, 200, 120), "single") == pytest.approx((5 / 9,) * 3)
    assert estimate_discounts((0, 3, 2, 1), "modified") is None  # no singletons: undefined
    assert estimate_discounts((10, 0, 2, 1), "modified") is None


def test_single_discount_bigram_by_hand():
    lm = KneserNeyLM(2, 4, discount="single").fit(TOY)
    # Unigrams use continuation counts N1+(. w): a follows b and c -> 2, b follows a -> 1,
    # c follows b -> 1, d -> 0 (the raw count of a is 3: the classic bug would use it).
    # n1 = 2, n2 = 1: D = 2 / (2 + 2) = 0.5; total 4; gamma = 0.5 * 3 / 4 = 0.375
    # p1(a) = (2 - .5)/4 + .375/4 = 0.46875, p1(b) = p1(c) = .5/4 + .09375 = 0.21875, p1(d) = .09375
    p1 = [0.46875, 0.21875, 0.21875, 0.09375]
    # Bigrams (raw counts): ab 3, ba 1, bc 2, ca 2: n1 = 1, n2 = 2, D = 1 / (1 + 4) = 0.2
    # after a: total 3, backoff 0.2 * 1: p(b|a) = (2.8 + .2 * .21875)/3, p(w|a) = .2 p1(w) / 3
    after_a = [0.2 * 0.46875 / 3, (2.8 + 0.2 * 0.21875) / 3, 0.2 * 0.21875 / 3, 0.2 * 0.09375 / 3]
    # after b: total 3 (ba 1, bc 2), backoff 0.2 * 2 = 0.4
    after_b = [(0.8 + 0.4 * 0.46875) / 3, 0.4 * 0.21875 / 3, (1.8 + 0.4 * 0.21875) / 3]
    after_b.append(0.4 * 0.09375 / 3)
    np.testing.assert_allclose(lm.distribution([]), p1, rtol=1e-12)
    np.testing.assert_allclose(lm.distribution([3]), p1, rtol=1e-12)  # unseen context d
    np.testing.assert_allclose(lm.distribution([0]), after_a, rtol=1e-12)
    np.testing.assert_allclose(lm.distribution([2, 1]), after_b, rtol=1e-12)  # last token only
    assert lm.discounts.tolist() == [[0.5] * 3, [0.2] * 3]


def test_modified_discounts_bigram_by_hand():
    lm = KneserNeyLM(2, 4, discount="modified").fit(TOY)
    # Unigram continuation counts a 2, b 1, c 1: n3 = 0, so the fallback D = 0.5, 1, 1.5:
    # a loses 1, b and c 0.5 each: total 4, backoff 2
    # p1(a) = 1/4 + 2/4 * 1/4 = 0.375, p1(b) = p1(c) = .5/4 + .125 = 0.25, p1(d) = 0.125
    p1 = [0.375, 0.25, 0.25, 0.125]
    # Bigram raw counts ab 3, ba 1, bc 2, ca 2: n1..n4 = 1, 2, 1, 0; Y = 1 / (1 + 4) = 0.2
    # D1 = 1 - 2 * .2 * 2/1 = 0.2, D2 = 2 - 3 * .2 * 1/2 = 1.7, D3+ = 3 - 4 * .2 * 0/1 = 3
    assert lm.fallback == [1]
    np.testing.assert_allclose(lm.discounts, [[0.5, 1.0, 1.5], [0.2, 1.7, 3.0]], rtol=1e-12)
    # after a: ab (3) loses D3+ = 3 entirely: total 3, backoff 3 -> p(w|a) = p1(w)
    # after b: ba 1 - .2 = .8, bc 2 - 1.7 = .3, total 3, backoff .2 + 1.7 = 1.9
    after_b = [(0.8 + 1.9 * 0.375) / 3, 1.9 * 0.25 / 3, (0.3 + 1.9 * 0.25) / 3, 1.9 * 0.125 / 3]
    # after c: ca 2 - 1.7 = .3, total 2, backoff 1.7
    after_c = [(0.3 + 1.7 * 0.375) / 2, 1.7 * 0.25 / 2, 1.7 * 0.25 / 2, 1.7 * 0.125 / 2]
    np.testing.assert_allclose(lm.distribution([]), p1, rtol=1e-12)
    np.testing.assert_allclose(lm.distribution([0]), p1, rtol=1e-12)
    np.testing.assert_allclose(lm.distribution([1]), after_b, rtol=1e-12)
    np.testing.assert_allclose(lm.distribution([2]), after_c, rtol=1e-12)
    # a stream: the first token has no history and uses the unigram distribution
    expected = np.log([p1[0], p1[1], after_b[2], after_c[3]])
    np.testing.assert_allclose(lm.score([0, 1, 2, 3]), expected, rtol=1e-12)
    assert lm.perplexity([0, 1, 2, 3]) == pytest.approx(math.exp(-expected.mean()), rel=1e-12)


def test_order_one_is_a_smoothed_unigram_of_raw_counts():
    lm = KneserNeyLM(1, 4, discount="single").fit(TOY)
    # raw counts a 4, b 3, c 2: n1 = 0 -> fallback D = 0.5; total 9, backoff 1.5
    np.testing.assert_allclose(
        lm.distribution([1, 2]), (np.array([3.5, 2.5, 1.5, 0.0]) + 1.5 / 4) / 9, rtol=1e-12
    )


# ---- properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("discount", ["modified", "single"])
@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_distributions_sum_to_one(order, discount):
    rng = np.random.default_rng(order)
    V = 50
    train = zipf_stream(rng, 20_000, V - 3)  # the last 3 tokens never occur
    lm = KneserNeyLM(order, V, discount).fit(train)
    starts = rng.integers(0, len(train) - order, size=20)
    contexts = [train[s : s + length] for s in starts for length in range(order)]  # seen
    contexts += [rng.integers(0, V, size=rng.integers(0, order + 2)) for _ in range(40)]  # any
    for context in contexts:
        p = lm.distribution(context)
        assert p.min() > 0 and abs(p.sum() - 1) < 1e-9, (list(context), p.sum())


def test_score_matches_the_distribution_of_each_history():
    rng = np.random.default_rng(0)
    lm = KneserNeyLM(4, 30, "modified").fit(zipf_stream(rng, 5_000, 30))
    ids = zipf_stream(rng, 200, 30)
    expected = [math.log(lm.distribution(ids[max(i - 3, 0) : i])[ids[i]]) for i in range(200)]
    np.testing.assert_allclose(lm.score(ids), expected, rtol=1e-12)


def test_scoring_in_chunks_keeps_the_history(monkeypatch):
    rng = np.random.default_rng(2)
    lm = KneserNeyLM(4, 12, "modified").fit(zipf_stream(rng, 3_000, 12))
    ids = zipf_stream(rng, 100, 12)
    whole = lm.score(ids)
    monkeypatch.setattr("lmkit.ngram._SCORE_CHUNK", 7)  # chunks shorter than a context + token
    np.testing.assert_array_equal(lm.score(ids), whole)


def test_unseen_token_has_finite_log_probability():
    lm = KneserNeyLM(3, 10, "modified").fit(np.tile([0, 1, 2, 3, 4], 200))
    logp = lm.score([0, 1, 9, 2, 7, 7])
    assert np.isfinite(logp).all() and logp[2] < logp[1]


def test_uniform_model_has_perplexity_of_the_vocabulary_size():
    # every token once: n1 = 7, n2 = 0, D = 7 / 7 = 1 takes all the mass to the uniform base
    lm = KneserNeyLM(1, 7, "single").fit(np.arange(7))
    assert lm.perplexity(np.arange(7)) == pytest.approx(7.0)


# ---- an independent, deliberately simple reference -------------------------------------------


def reference_single_kn(train: list[int], order: int, vocab_size: int):
    """Interpolated KN with one discount per order, written with dictionaries and tuples."""
    grams = {
        k: Counter(tuple(train[i : i + k]) for i in range(len(train) - k + 1))
        for k in range(1, order + 1)
    }
    adjusted = {order: grams[order]}
    for k in range(1, order):
        # continuation count: each distinct (k+1)-gram adds one to its k-token suffix
        adjusted[k] = Counter(gram[1:] for gram in grams[k + 1])
    children = {k: defaultdict(dict) for k in adjusted}
    discount = {}
    for k, counts in adjusted.items():
        for gram, c in counts.items():
            children[k][gram[:-1]][gram[-1]] = c
        n1 = sum(1 for c in counts.values() if c == 1)
        n2 = sum(1 for c in counts.values() if c == 2)
        discount[k] = n1 / (n1 + 2 * n2) if n1 > 0 else 0.5

    def prob(history: tuple, w: int) -> float:
        p = 1.0 / vocab_size
        for k in range(1, order + 1):
            if k - 1 > len(history):
                break
            context = history[len(history) - (k - 1) :]
            seen = children[k].get(context, {})
            total = sum(seen.values())
            if total == 0:
                continue  # unseen context: the lower order as it is
            d = discount[k]
            p = (max(seen.get(w, 0) - d, 0) + d * len(seen) * p) / total
        return p

    return prob


@pytest.mark.parametrize("seed", range(6))
def test_single_discount_matches_the_dictionary_reference(seed):
    rng = np.random.default_rng(seed)
    order, V = int(rng.integers(1, 5)), int(rng.integers(3, 9))
    train = zipf_stream(rng, int(rng.integers(order, 400)), V).tolist()
    prob = reference_single_kn(train, order, V)
    lm = KneserNeyLM(order, V, "single").fit(np.array(train))
    test = rng.integers(0, V, size=60).tolist()
    expected = [math.log(prob(tuple(test[max(i - order + 1, 0) : i]), test[i])) for i in range(60)]
    np.testing.assert_allclose(lm.score(test), expected, rtol=1e-12)
    context = tuple(train[-(order - 1) :]) if order > 1 else ()
    np.testing.assert_allclose(
        lm.distribution(context), [prob(context, w) for w in range(V)], rtol=1e-12
    )


# ---- real text, persistence, errors ----------------------------------------------------------


def test_perplexity_falls_from_order_one_to_three_on_shakespeare_chars(shakespeare):
    train, val = np.asarray(shakespeare.ids["train"]), np.asarray(shakespeare.ids["val"])
    ppl = [KneserNeyLM(n, shakespeare.vocab_size).fit(train).perplexity(val) for n in (1, 2, 3)]
    assert ppl[0] > ppl[1] > ppl[2], ppl
    assert ppl[0] < 65 and ppl[2] < 10, ppl  # better than uniform; trigrams of chars help a lot


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    lm = KneserNeyLM(3, 20, "modified").fit(zipf_stream(rng, 3_000, 20))
    lm.save(tmp_path / "kn3.npz")
    loaded = KneserNeyLM.load(tmp_path / "kn3.npz")
    assert (loaded.order, loaded.vocab_size, loaded.discount) == (3, 20, "modified")
    assert loaded.fallback == lm.fallback and loaded.num_ngrams == lm.num_ngrams
    ids = zipf_stream(rng, 500, 20)
    np.testing.assert_array_equal(loaded.score(ids), lm.score(ids))
    with np.load(tmp_path / "kn3.npz", allow_pickle=False) as f:  # plain arrays, no pickle
        assert all(f[name].dtype != object for name in f.files)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="order=0 must be a positive integer"):
        KneserNeyLM(0, 10)
    with pytest.raises(ValueError, match=r"discount='absolute' is unknown"):
        KneserNeyLM(3, 10, discount="absolute")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 10\)"):
        KneserNeyLM(2, 10).fit([1, 2, 10])
    with pytest.raises(ValueError, match="needs at least 3 training tokens"):
        KneserNeyLM(3, 10).fit([1, 2])
    with pytest.raises(RuntimeError, match="not fitted"):
        KneserNeyLM(3, 10).score([1, 2])
    with pytest.raises(ValueError, match="1-D integer array"):
        KneserNeyLM(2, 10).fit(np.ones((3, 3), dtype=int))


def test_baseline_metrics_scores_what_the_model_scores_and_caches(shakespeare):
    first = baseline_metrics(shakespeare, order=3)
    assert first["cached"] is False and first["order"] == 3 and "test" not in first
    lm = KneserNeyLM(3, shakespeare.vocab_size).fit(np.asarray(shakespeare.ids["train"]))
    logp = lm.score(np.asarray(shakespeare.ids["val"]))[1:]  # every token after the first
    val = first["val"]
    assert val["tokens"] == len(shakespeare.ids["val"]) - 1
    assert val["loss"] == pytest.approx(-logp.mean(), rel=1e-12)
    assert val["ppl"] == pytest.approx(math.exp(val["loss"]), rel=1e-12)
    assert val["bpb"] == pytest.approx(val["loss"] / math.log(2), rel=1e-12)  # 1 byte per char
    again = baseline_metrics(shakespeare, order=3)
    assert again["cached"] is True and again["val"] == val
    cached = list((cache_root() / "ngram").glob("*.npz"))
    assert any(KneserNeyLM.load(p).order == 3 for p in cached)
    assert baseline_metrics(shakespeare, order=2)["val"]["ppl"] > val["ppl"]  # its own entry
