"""WikiText as lm-evaluation-harness scores it: lmkit's articles, detokenizer and counts against
the harness's own code, on the real WikiText-2 files."""

from __future__ import annotations

import math

import pytest
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

from lmkit.data.corpora import data_root, read_text
from lmkit.data.wikitext import (
    detokenize,
    document_metrics,
    harness_words,
    split_articles,
    wikitext_split_file,
)


@pytest.fixture(scope="module", params=["val", "test"])
def pages(request):
    path, variant = wikitext_split_file(data_root(), request.param)
    text = read_text(path)
    articles = split_articles(text)
    assert "".join(articles) == text  # exact slices, nothing lost or repeated
    return request.param, variant, articles


def test_wikitext2_has_its_published_article_counts(pages):
    split, variant, articles = pages
    if not variant.startswith("wikitext-2-v1"):
        pytest.skip(
            f"the data root holds {variant}; the counts are checked where it has only the "
            "tokenized wikitext-2/ files (as ../shared/data, which CI uses)"
        )
    # EleutherAI/wikitext_document_level, wikitext-2: 60 validation and 62 test documents
    assert len(articles) == {"val": 60, "test": 62}[split]
    for page in articles[1:]:
        title = page.splitlines()[0]
        assert title.startswith(" = ") and not title.startswith(" = = "), title


def test_detokenizer_and_counts_are_the_harness(pages):
    _, _, articles = pages
    for page in articles:
        assert detokenize(page) == wikitext_detokenizer({"page": page})
        counts = process_results({"page": page}, [-1.0])
        assert harness_words(page) == counts["word_perplexity"][1]
        assert len(page.encode()) == counts["byte_perplexity"][1]


def test_document_metrics_aggregate_as_the_harness(pages):
    _, _, articles = pages
    logliks = [-0.9 * len(p) - i for i, p in enumerate(articles)]
    ours = document_metrics(logliks, articles)
    items = [process_results({"page": p}, [ll]) for p, ll in zip(articles, logliks, strict=True)]
    assert math.isclose(
        ours["word_perplexity"], weighted_perplexity([i["word_perplexity"] for i in items])
    )
    assert math.isclose(
        ours["byte_perplexity"], weighted_perplexity([i["byte_perplexity"] for i in items])
    )
    assert math.isclose(ours["bits_per_byte"], bits_per_byte([i["bits_per_byte"] for i in items]))


def test_a_raw_variant_under_the_data_root_is_preferred(tmp_path):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = A = \n text \n")
    path, variant = wikitext_split_file(tmp_path, "test")
    assert path.name == "wiki.test.raw" and variant == "wikitext-2-raw-v1"
    with pytest.raises(FileNotFoundError, match="LMKIT_DATA_DIR"):
        wikitext_split_file(tmp_path, "val")
