"""WikiText as lm-evaluation-harness scores it: articles, its detokenizer, its word and byte counts.

The harness's ``wikitext`` task scores each article of WikiText-2 (``EleutherAI/
wikitext_document_level``, raw variant) as one document with rolling windows, and reports

- word perplexity ``exp(-sum(loglik) / sum(words))``, ``words = len(re.split(r"\\s+", page))``
  of the article as stored (before detokenizing),
- byte perplexity ``exp(-sum(loglik) / sum(bytes))`` and bits per byte
  ``-sum(loglik) / sum(bytes) / ln 2``, ``bytes`` the UTF-8 bytes of the article as stored,

where ``loglik`` is the log-likelihood of the *detokenized* article (WikiText's spaced
punctuation and ``@-@`` separators undone). The functions here reproduce those definitions; the
tests check them against the harness's own code where it is installed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

# A top-level heading line, " = Title = ", starts an article; sections are " = = Title = = ".
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")

# The harness's detokenizer as an ordered list of rules: (literal or regex, replacement).
_LITERAL, _REGEX = "literal", "regex"
_DETOKENIZE_RULES: tuple[tuple[str, str, str], ...] = (
    (_LITERAL, "s '", "s'"),  # possessive plural
    (_REGEX, r"/' [0-9]/", r"/'[0-9]/"),
    (_LITERAL, " @-@ ", "-"),  # number and word separators
    (_LITERAL, " @,@ ", ","),
    (_LITERAL, " @.@ ", "."),
    *((_LITERAL, f" {p} ", f"{p} ") for p in ":;.!?,"),  # punctuation attached to its word
    (_REGEX, r"\(\s*([^\)]*?)\s*\)", r"(\1)"),  # no spaces inside brackets and quotes
    (_REGEX, r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (_REGEX, r"{\s*([^}]*?)\s*}", r"{\1}"),
    (_REGEX, r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
    (_REGEX, r"'\s*([^']*?)\s*'", r"'\1'"),
    (_LITERAL, "= = = =", "===="),  # section markers
    (_LITERAL, "= = =", "==="),
    (_LITERAL, "= =", "=="),
    (_LITERAL, " \u00b0 ", "\u00b0"),  # degree sign
    (_LITERAL, " \n", "\n"),
    (_LITERAL, "\n ", "\n"),
    (_LITERAL, " N ", " 1 "),  # WikiText's number placeholder
    (_LITERAL, " 's", "'s"),
)


def split_articles(text: str) -> list[str]:
    """The articles of a WikiText file, each starting at its " = Title = " line (text before the
    first heading joins the first article). Each is an exact slice: together they are `text`."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _ARTICLE_HEADING.match(line.rstrip("\n"))]
    if not starts:
        return [text] if text.strip() else []
    starts[0] = 0
    bounds = [*starts, len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]


def detokenize(page: str) -> str:
    """A WikiText article as the harness scores it (its ``wikitext_detokenizer``)."""
    for kind, pattern, replacement in _DETOKENIZE_RULES:
        if kind == _LITERAL:
            page = page.replace(pattern, replacement)
        else:
            page = re.sub(pattern, replacement, page)
    return page


def harness_words(page: str) -> int:
    """Words of an article as the harness counts them: ``len(re.split(r"\\s+", page))`` (an
    article that starts or ends with whitespace counts one empty word there)."""
    return len(re.split(r"\s+", page))


def page_bytes(page: str) -> int:
    return len(page.encode("utf-8"))


def document_metrics(logliks: Sequence[float], pages: Sequence[str]) -> dict[str, float]:
    """word_perplexity, byte_perplexity and bits_per_byte over documents, as the harness
    aggregates them (sums over all documents, then one ratio)."""
    if len(logliks) != len(pages) or not pages:
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(pages)} documents")
    total = math.fsum(logliks)
    words = sum(harness_words(p) for p in pages)
    nbytes = sum(page_bytes(p) for p in pages)
    return {
        "word_perplexity": math.exp(min(-total / words, 700.0)),
        "byte_perplexity": math.exp(min(-total / nbytes, 700.0)),
        "bits_per_byte": -total / nbytes / math.log(2),
        "documents": len(pages),
        "words": words,
        "bytes": nbytes,
    }


# Where a raw WikiText-2 (the official wikitext-2-raw-v1 files) is looked for under the data root.
RAW_FILES = {"val": "wikitext-2-raw/wiki.valid.raw", "test": "wikitext-2-raw/wiki.test.raw"}
TOKENIZED_FILES = {"val": "wikitext-2/valid.txt", "test": "wikitext-2/test.txt"}


def wikitext_split_file(root: Path, split: str) -> tuple[Path, str]:
    """(file, variant) of a WikiText-2 split: the raw variant (the harness's) when it is under
    the data root, else the tokenized one (rare words as <unk>)."""
    if split not in RAW_FILES:
        raise ValueError(f"split={split!r}: WikiText-2's documents are scored on val or test")
    raw = root / RAW_FILES[split]
    if raw.is_file():
        return raw, "wikitext-2-raw-v1"
    tokenized = root / TOKENIZED_FILES[split]
    if not tokenized.is_file():
        raise FileNotFoundError(
            f"document-level evaluation needs {raw} (raw) or {tokenized} (tokenized) WikiText-2; "
            "set LMKIT_DATA_DIR to a folder that holds one"
        )
    return tokenized, "wikitext-2-v1 (tokenized: rare words are <unk>)"
