"""Fixtures of the data tests: the real corpora (read-only) and a per-session token cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmkit.data.corpora import read_text
from lmkit.data.datamodule import TextDataModule

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def lmkit_env(tmp_path_factory):
    """LMKIT_DATA_DIR (if unset) -> the shared corpora; LMKIT_CACHE_DIR -> a session temp dir,
    so no test writes into the data root or the user's ~/.cache/lmkit."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("LMKIT_DATA_DIR"):
            for candidate in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
                if candidate.is_dir():
                    mp.setenv("LMKIT_DATA_DIR", str(candidate))
                    break
        mp.setenv("LMKIT_CACHE_DIR", str(tmp_path_factory.mktemp("lmkit-cache")))
        yield


@pytest.fixture(scope="session")
def data_dir(lmkit_env) -> Path:
    root = Path(os.environ.get("LMKIT_DATA_DIR", "data"))
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"the real corpora are not under {root}; set LMKIT_DATA_DIR")
    return root


@pytest.fixture(scope="session")
def shakespeare_text(data_dir) -> str:
    return read_text(data_dir / "tinyshakespeare" / "input.txt")


@pytest.fixture(scope="session")
def shakespeare_char(data_dir) -> TextDataModule:
    """Tiny Shakespeare with the char tokenizer, prepared once per session."""
    dm = TextDataModule("tinyshakespeare", block_size=64, batch_size=4)
    dm.prepare()
    return dm


@pytest.fixture(scope="session")
def wikitext_bpe(data_dir) -> TextDataModule:
    """Byte-level BPE on WikiText-2's valid (as train) and test (as val) files: real text with
    non-ASCII characters, small enough to train and encode in a few seconds."""
    dm = TextDataModule(
        train=str(data_dir / "wikitext-2" / "valid.txt"),
        val=str(data_dir / "wikitext-2" / "test.txt"),
        tokenizer={"kind": "bpe", "vocab_size": 512},
        block_size=32,
        batch_size=4,
    )
    dm.prepare()
    return dm


@pytest.fixture
def write_file(tmp_path):
    """Write text (str) or raw bytes to tmp_path/name and return the path."""

    def write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            content = content.encode("utf-8")
        path.write_bytes(content)
        return path

    return write
