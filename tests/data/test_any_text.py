"""Any UTF-8 text trains: a character only val has, and the messages for what is not text."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support import compose_config

from lmkit.data.corpora import read_text
from lmkit.data.datamodule import TextDataModule
from lmkit.data.tokenizers import train_tokenizer
from lmkit.evaluation import nll_sums

# English prose with straight apostrophes, then a tail (inside the last 10%, the val split of
# data=text without data.val) that writes them curly: '’' (U+2019, 3 UTF-8 bytes) is the one
# character val has and train lacks.
_LINES = [
    "It's a truth universally acknowledged, that a single man in possession of a good fortune "
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.",
    "My dear Mr. Bennet, said his lady to him one day, have you heard that Netherfield Park is "
    "let at last? Mr. Bennet replied that he had not; she's sure of it.",
]
PROSE = "\n".join(_LINES * 8) + "\n" + "It’s so, and she’s sure of it.\n" * 4
CUT = int(len(PROSE) * 0.9)
CURLY = "’"


def test_the_prose_has_a_character_only_val_has():
    assert CURLY not in PROSE[:CUT] and PROSE[CUT:].count(CURLY) == 8
    assert set(PROSE[CUT:]) - set(PROSE[:CUT]) == {CURLY}


def test_a_character_only_val_has_is_a_token_scored_at_its_bytes(write_file, caplog):
    path = write_file("prose.txt", PROSE)
    dm = TextDataModule(train=str(path), block_size=16, batch_size=2)
    with caplog.at_level(logging.INFO, logger="lmkit.data.token_cache"):
        dm.prepare()
    tok = dm.tokenizer
    # nanoGPT's vocabulary: the sorted characters of the whole file
    assert tok.tokenizer.get_vocab() == {c: i for i, c in enumerate(sorted(set(PROSE)))}
    # the characters train has keep the ids a train-only vocabulary gives them ('’' sorts last)
    train_only = train_tokenizer("char", PROSE[:CUT]).tokenizer.get_vocab()
    assert {c: i for c, i in tok.tokenizer.get_vocab().items() if c != CURLY} == train_only
    # lossless, and bits per byte divide by the true UTF-8 bytes ('’' counts 3)
    assert tok.decode(dm.ids["val"].tolist()) == PROSE[CUT:]
    assert int(tok.token_bytes[tok.encode(CURLY)[0]]) == 3
    assert dm.scored_bytes("val") == len(PROSE[CUT + 1 :].encode())
    assert dm.meta["bytes"]["val"] == len(PROSE[CUT:].encode())
    # counted, kept in the cache's meta.json, and logged once at preparation
    expected = {"val": {"count": 8, "chars": [CURLY]}}
    assert dm.meta["unseen_chars"] == expected
    assert json.loads((dm.cache_dir / "meta.json").read_text())["unseen_chars"] == expected
    warnings = [r for r in caplog.records if "never occur in the train split" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"val 8 (['{CURLY}'])" in warnings[0].getMessage()
    # a cache hit logs it again (once), from meta.json
    caplog.clear()
    again = TextDataModule(train=str(path), block_size=16, batch_size=2)
    with caplog.at_level(logging.INFO, logger="lmkit.data.token_cache"):
        again.prepare()
    assert again.cache_hit and again.meta["unseen_chars"] == expected
    assert sum("val 8" in r.getMessage() for r in caplog.records) == 1
    # an evaluation pass counts the same bytes
    token_bytes = torch.as_tensor(tok.token_bytes)
    nbytes = 0.0
    for _, y in dm.val_dataloader():
        logits = torch.zeros(*y.shape, dm.vocab_size)
        nbytes += float(nll_sums(logits, y, token_bytes)[2])
    assert nbytes == dm.scored_bytes("val")


def test_a_cache_from_before_the_count_gets_it(write_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path / "cache"))  # its own cache, edited below
    path = str(write_file("prose.txt", PROSE))
    dm = TextDataModule(train=path, block_size=16)
    dm.prepare()
    meta = json.loads((dm.cache_dir / "meta.json").read_text())
    del meta["unseen_chars"]  # as lmkit wrote it before it counted them
    (dm.cache_dir / "meta.json").write_text(json.dumps(meta))
    again = TextDataModule(train=path, block_size=16)
    again.prepare()
    assert again.cache_hit and again.meta["unseen_chars"] == {"val": {"count": 8, "chars": [CURLY]}}


def test_a_corpus_without_unseen_characters_logs_zero(write_file, caplog):
    text = "abc abc abc\n" * 30
    dm = TextDataModule(train=str(write_file("abc.txt", text)), block_size=8)
    with caplog.at_level(logging.INFO, logger="lmkit.data.token_cache"):
        dm.prepare()
    assert dm.meta["unseen_chars"] == {"val": {"count": 0, "chars": []}}
    (record,) = [r for r in caplog.records if "never occur in the train split" in r.getMessage()]
    assert record.levelno == logging.INFO and record.getMessage().endswith(": val 0")


def test_text_whose_val_has_an_unseen_character_trains_and_evaluates(write_file, tmp_path):
    """data=text with only data.train: the run trains, evaluates and fits its n-gram baseline on
    the same ids; both bits per byte divide by the true UTF-8 bytes of val."""
    from lmkit.run.train import train

    path = write_file("prose.txt", PROSE)
    cfg = compose_config(
        "data=text",
        f"data.train={path}",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "ngram.order=3",
        run_dir=tmp_path / "run",
    )
    results = train(cfg)
    val = PROSE[CUT:]
    tokens, true_bytes = len(val) - 1, len(val[1:].encode())
    assert true_bytes == tokens + 2 * 8  # the 8 curly apostrophes add 2 bytes each
    assert math.isfinite(results["val_loss"]) and math.isfinite(results["val_bpb"])
    assert results["val_bpb"] == pytest.approx(
        results["val_loss"] * tokens / (math.log(2) * true_bytes), rel=1e-5
    )
    baseline = results["baseline"]["val"]
    assert baseline["tokens"] == tokens and math.isfinite(baseline["loss"])
    assert baseline["bpb"] == pytest.approx(
        baseline["loss"] * tokens / (math.log(2) * true_bytes), rel=1e-9
    )
    assert Path(cfg.run_dir, "results.json").is_file()


# ---- what is not text -------------------------------------------------------------------


def test_nul_characters_are_named_not_called_an_encoding_error(write_file):
    path = write_file("nul.txt", "some text\0\0 and more text\n")
    with pytest.raises(ValueError) as info:
        read_text(path)
    message = str(info.value)
    assert "holds 2 NUL characters (U+0000, the first at byte offset 9)" in message
    assert "UTF-8 text" not in message and "\n" not in message
    # UTF-16 text without a byte-order mark is valid UTF-8 full of NULs: the message says so
    utf16 = write_file("utf16.txt", "plain words\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"holds 12 NUL characters .* UTF-16 text"):
        TextDataModule(train=str(utf16)).prepare()
    with pytest.raises(ValueError, match=r"bom.txt is UTF-16 text \(it starts with a UTF-16"):
        read_text(write_file("bom.txt", "plain words\n".encode("utf-16")))


@pytest.mark.parametrize(
    "content",
    [" ", "\n\n\n", " \t\r\n  \r", "\u200b\ufeff\u00a0\u3000\n", "\x07\x1b\x7f \n"],
    ids=["space", "newlines", "mixed", "invisible", "controls"],
)
def test_a_file_without_visible_text_is_refused_like_an_empty_one(write_file, content):
    val = str(write_file("val.txt", "some text\n" * 10))
    path = write_file("blank.txt", content)
    with pytest.raises(ValueError) as blank:
        TextDataModule(train=str(path), val=val).prepare()
    message = str(blank.value)
    assert message.startswith(f"file {path} is empty: its ")
    assert message.endswith(
        " characters are all whitespace or invisible; give a file that holds the text to model."
    )
    assert "\n" not in message
    with pytest.raises(ValueError, match=r"^file .*empty.txt is empty; give a file that holds"):
        TextDataModule(train=str(write_file("empty.txt", "")), val=val).prepare()


@pytest.mark.parametrize("content", [" a ", "\n\u200b.\n", "\x07é\n", "日本語"])
def test_one_visible_character_is_text(write_file, content):
    assert read_text(write_file("short.txt", content)) == content


def test_a_curly_apostrophe_tokenizes_with_a_char_vocabulary_of_every_split(write_file):
    """Separate val and test files: their characters are in the vocabulary too."""
    train = write_file("train.txt", "the cat sat on the mat\n" * 20)
    val = write_file("val.txt", "the cat’s mat\n" * 5)
    test = write_file("test.txt", "the mat — the cat\n" * 5)
    dm = TextDataModule(train=str(train), val=str(val), test=str(test), block_size=8)
    dm.prepare()
    assert dm.meta["unseen_chars"] == {
        "val": {"count": 5, "chars": [CURLY]},
        "test": {"count": 5, "chars": ["—"]},
    }
    for split, p in (("val", val), ("test", test)):
        text = read_text(p)
        np.testing.assert_array_equal(dm.ids[split], dm.tokenizer.encode(text))
        assert dm.scored_bytes(split) == len(text[1:].encode())
