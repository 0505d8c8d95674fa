from __future__ import annotations

import numpy as np
import pytest

from lmkit.data.corpora import read_text
from lmkit.data.tokenizers import Tokenizer, train_tokenizer

ANY_TEXT = [
    "plain ascii",
    "  leading and trailing spaces  \n\n\n",
    "tabs\tand\r\ncarriage returns\r",
    "ünïcödé, 日本語, Ελληνικά, emoji 😀👍🏽, combining e\u0301",
    "\x00 control \x07 characters \x7f",
    "",
]


@pytest.fixture(scope="session")
def shakespeare_tokenizer(shakespeare_text) -> Tokenizer:
    return train_tokenizer("char", shakespeare_text)


@pytest.fixture(scope="session")
def wikitext_valid(data_dir) -> str:
    return read_text(data_dir / "wikitext-2" / "valid.txt")


@pytest.fixture(scope="session")
def bpe(wikitext_valid) -> Tokenizer:
    return train_tokenizer("bpe", wikitext_valid.splitlines(keepends=True), vocab_size=1024)


# ---- char ------------------------------------------------------------------------------


def test_char_vocabulary_is_nanogpt(shakespeare_tokenizer, shakespeare_text):
    tok = shakespeare_tokenizer
    assert tok.kind == "char" and tok.vocab_size == 65
    stoi = {c: i for i, c in enumerate(sorted(set(shakespeare_text)))}  # nanoGPT's vocabulary
    sample = "hii there\nROMEO: O, she doth teach the torches to burn bright!"
    assert tok.encode(sample) == [stoi[c] for c in sample]


def test_char_round_trip(shakespeare_tokenizer, shakespeare_text):
    ids = shakespeare_tokenizer.encode(shakespeare_text)
    assert len(ids) == len(shakespeare_text)
    assert shakespeare_tokenizer.decode(ids) == shakespeare_text


def test_char_is_deterministic(shakespeare_text):
    lines = shakespeare_text.splitlines(keepends=True)
    a = train_tokenizer("char", lines)
    b = train_tokenizer("char", reversed(lines))
    assert a.to_json() == b.to_json()


def test_char_unknown_character_raises(shakespeare_tokenizer):
    with pytest.raises(ValueError, match=r"characters \['é', '😀'\] are not in the char vocab"):
        shakespeare_tokenizer.encode("café 😀")
    with pytest.raises(ValueError, match=r"characters \['€'\]"):
        shakespeare_tokenizer.encode_batch(["fine", "€3"])


def test_char_token_bytes():
    tok = train_tokenizer("char", "aé日😀\n")
    text = "😀a日\né"
    assert tok.token_bytes.dtype == np.int64 and tok.token_bytes.shape == (tok.vocab_size,)
    assert int(tok.token_bytes[tok.encode(text)].sum()) == len(text.encode())


# ---- bpe -------------------------------------------------------------------------------


def test_bpe_vocabulary(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 1024
    vocab = bpe.tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(1024))


def test_bpe_round_trips_wikitext_lines(bpe, wikitext_valid):
    lines = wikitext_valid.splitlines(keepends=True)
    non_ascii = [line for line in lines if not line.isascii()]
    assert len(non_ascii) > 50  # the test covers real non-ASCII text
    for line in non_ascii + lines[:200]:
        assert bpe.decode(bpe.encode(line)) == line
    assert bpe.decode(bpe.encode(wikitext_valid)) == wikitext_valid


@pytest.mark.parametrize("text", ANY_TEXT, ids=range(len(ANY_TEXT)))
def test_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert int(bpe.token_bytes[ids].sum()) == len(text.encode())


def test_bpe_token_bytes_count_utf8_bytes(bpe, wikitext_valid):
    assert bpe.token_bytes.shape == (bpe.vocab_size,) and bpe.token_bytes.min() >= 1
    ids = bpe.encode(wikitext_valid)
    assert int(bpe.token_bytes[ids].sum()) == len(wikitext_valid.encode())
    # a token that is part of a multi-byte character counts its bytes, not a lossy decode
    partial = bpe.encode("é")  # two bytes; the 1024-token vocabulary may or may not merge them
    assert int(bpe.token_bytes[partial].sum()) == 2


def test_bpe_lines_encode_like_the_whole_text(bpe, wikitext_valid):
    """Tokens never span a newline, so encoding line by line (as datasets.map does) gives the
    ids of the whole text; the trailing-space case is where plain GPT-2 pre-tokenization differs."""
    text = wikitext_valid[:50_000] + "a line with a trailing space \nnext\n\n\n  spaces\n"
    lines = text.splitlines(keepends=True)
    assert [i for ids in bpe.encode_batch(lines) for i in ids] == bpe.encode(text)


def test_bpe_compresses(bpe, wikitext_valid):
    assert len(bpe.encode(wikitext_valid)) < 0.45 * len(wikitext_valid.encode())


def test_bpe_is_deterministic(wikitext_valid):
    lines = wikitext_valid.splitlines(keepends=True)[:1000]
    a = train_tokenizer("bpe", lines, vocab_size=400)
    b = train_tokenizer("bpe", "".join(lines), vocab_size=400)
    assert a.to_json() == b.to_json()


# ---- persistence and errors ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind, bpe, shakespeare_tokenizer):
    tok = {"char": shakespeare_tokenizer, "bpe": bpe}[kind]
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert loaded.encode(text) == tok.encode(text)
    np.testing.assert_array_equal(loaded.token_bytes, tok.token_bytes)
    assert Tokenizer.from_json(tok.to_json()).to_json() == tok.to_json()


def test_config_errors():
    with pytest.raises(
        ValueError, match=r"kind='unigram' is unknown; choose one of \['char', 'bpe', 'word'\]"
    ):
        train_tokenizer("unigram", "text")
    with pytest.raises(ValueError, match=r"needs an integer vocab_size >= 256.*vocab_size=100"):
        train_tokenizer("bpe", "text", vocab_size=100)
    with pytest.raises(ValueError, match=r"needs an integer vocab_size"):
        train_tokenizer("bpe", "text")
    with pytest.raises(ValueError, match=r"'char' takes its vocabulary from the train text"):
        train_tokenizer("char", "text", vocab_size=100)
    with pytest.raises(ValueError, match="empty text"):
        train_tokenizer("char", [])
