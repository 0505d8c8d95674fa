"""The word-level tokenizer: whitespace words, the end of line as a token, <unk> for the rest."""

from __future__ import annotations

import numpy as np
import pytest

from lmkit.data.corpora import read_text
from lmkit.data.datamodule import TextDataModule
from lmkit.data.tokenizers import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def wikitext_valid(data_dir) -> str:
    return read_text(data_dir / "wikitext-2" / "valid.txt")


@pytest.fixture(scope="session")
def word(wikitext_valid) -> Tokenizer:
    return train_tokenizer("word", wikitext_valid.splitlines(keepends=True))


def test_words_newlines_and_unknown_words():
    tok = train_tokenizer("word", "the cat sat\non the mat\n\nthe end")
    assert tok.kind == "word"
    vocab = tok.tokenizer.get_vocab()
    # <unk> and the newline first, then by decreasing count (the 3, \n... ), ties by the word
    assert [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == [
        "<unk>",
        "\n",
        "the",
        "cat",
        "end",
        "mat",
        "on",
        "sat",
    ]
    ids = tok.encode("  the\tdog   sat \n\n on\u00a0the  mat")
    assert [tok.decode([i]) for i in ids] == ["the", "<unk>", "sat", "\n", "\n", "on", "the", "mat"]
    assert tok.decode(ids) == "the <unk> sat \n \n on the mat"


def test_wikitext_lines_round_trip_and_bytes_are_exact(word, wikitext_valid):
    lines = wikitext_valid.splitlines(keepends=True)
    ids = word.encode(wikitext_valid)
    assert [i for line in word.encode_batch(lines) for i in line] == ids  # line by line = whole
    assert len(ids) == sum(len(line.split()) + 1 for line in lines)  # words + one per line
    # WikiText lines are " w1 w2 ... wn \n": the decoded text lacks only the leading space
    assert " " + word.decode(ids) == wikitext_valid
    assert int(word.token_bytes[ids].sum()) == len(wikitext_valid.encode())


def test_token_bytes_count_one_space_per_token(word):
    assert word.token_bytes.dtype == np.int64 and word.token_bytes.min() >= 2
    text = "a  line\twith   odd spacing\nand zzzunknownzzz words"
    ids = word.encode(text)
    # the bytes of the text as decoded (single spaces, <unk> for unknown words) plus the last space
    assert int(word.token_bytes[ids].sum()) == len(word.decode(ids).encode()) + 1


def test_training_is_deterministic_and_saves(tmp_path, wikitext_valid):
    lines = wikitext_valid.splitlines(keepends=True)[:2000]
    a = train_tokenizer("word", lines)
    b = train_tokenizer("word", "".join(reversed(lines)))
    assert a.to_json() == b.to_json()
    a.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.kind == "word" and loaded.vocab_size == a.vocab_size
    text = " = Robert <unk> = \n \n Robert is an English actor . \n"
    assert loaded.encode(text) == a.encode(text)
    np.testing.assert_array_equal(loaded.token_bytes, a.token_bytes)


def test_word_config_errors():
    with pytest.raises(ValueError, match=r"kind='word' takes its vocabulary from the train text"):
        train_tokenizer("word", "text", vocab_size=100)
    with pytest.raises(ValueError, match="without words"):
        train_tokenizer("word", [" ", "\t"])


def test_wikitext2_word_level_matches_the_literature(data_dir):
    """The standard WikiText-2 word-level setup: 33,278 types and the usual token counts."""
    dm = TextDataModule("wikitext2", tokenizer={"kind": "word"}, block_size=32, batch_size=4)
    dm.prepare()
    assert dm.tokenizer.kind == "word" and dm.vocab_size == 33_278
    assert dm.meta["tokens"] == {"train": 2_088_628, "val": 217_646, "test": 245_569}
    for split, name in (("train", "train"), ("val", "valid"), ("test", "test")):
        size = (data_dir / "wikitext-2" / f"{name}.txt").stat().st_size
        assert dm.meta["bytes"][split] == size  # bits per byte divide by the file's bytes
