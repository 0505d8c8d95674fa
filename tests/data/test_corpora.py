from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lmkit.data import corpora
from lmkit.data.corpora import (
    CORPORA,
    SplitSource,
    cache_root,
    data_root,
    load_split,
    local_corpus,
    read_text,
    resolve_corpus,
    sha256_of,
)


def _readme_checksums(data_dir: Path) -> dict[str, str]:
    """The sha256 lines of the corpora README (the published reference)."""
    sums = {}
    for line in (data_dir / "README.md").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1]] = parts[0]
    return sums


def test_data_root_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("LMKIT_DATA_DIR", raising=False)
    assert data_root() == Path("data")
    monkeypatch.setenv("LMKIT_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path


def test_data_root_must_exist(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("LMKIT_DATA_DIR", str(missing))
    with pytest.raises(FileNotFoundError, match=r"LMKIT_DATA_DIR=.*nowhere is not an existing"):
        data_root()


def test_cache_root_is_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("LMKIT_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "lmkit"


def test_registry_checksums_match_the_readme(data_dir):
    sums = _readme_checksums(data_dir)
    files = [f for spec in CORPORA.values() for f in spec.files]
    assert {f.relpath: f.sha256 for f in files} == sums


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_resolve_named_corpus(data_dir, name):
    corpus = resolve_corpus(name)
    expected = {"tinyshakespeare": ["train", "val"], "wikitext2": ["train", "val", "test"]}
    assert list(corpus.splits) == expected[name]
    for split in corpus.splits.values():
        assert split.path.is_file()
        assert data_dir.resolve() in split.path.resolve().parents


def test_tinyshakespeare_split_is_nanogpt(data_dir, shakespeare_text):
    splits = resolve_corpus("tinyshakespeare").splits
    n = len(shakespeare_text)
    assert splits["train"].char_range(n) == (0, 1_003_854)
    assert splits["val"].char_range(n) == (1_003_854, n)
    assert n - 1_003_854 == 111_540


def test_unknown_corpus_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown corpus 'enwik9'.*tinyshakespeare.*wikitext2"):
        resolve_corpus("enwik9")


def test_missing_corpus_says_what_to_put_where(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LMKIT_DATA_DIR", str(empty))
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path / "cache"))

    def offline(url, dest, sha256):
        raise OSError("network is unreachable")

    monkeypatch.setattr(corpora, "_download", offline)
    with pytest.raises(FileNotFoundError) as info:
        resolve_corpus("tinyshakespeare")
    message = str(info.value)
    assert str((empty / "tinyshakespeare" / "input.txt").resolve()) in message
    assert CORPORA["tinyshakespeare"].files[0].sha256 in message
    assert "or set LMKIT_DATA_DIR" in message
    assert "network is unreachable" in message


def test_missing_corpus_is_downloaded_into_the_cache(monkeypatch, tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LMKIT_DATA_DIR", str(empty))
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path / "cache"))
    source = data_dir / "tinyshakespeare" / "input.txt"
    real_download = corpora._download
    # serve the real file through a file:// URL: the real download code, no network
    monkeypatch.setattr(
        corpora,
        "_download",
        lambda url, dest, sha: real_download(source.resolve().as_uri(), dest, sha),
    )
    corpus = resolve_corpus("tinyshakespeare")
    path = corpus.splits["train"].path
    assert path == tmp_path / "cache" / "corpora" / "tinyshakespeare" / "input.txt"
    assert sha256_of(path) == CORPORA["tinyshakespeare"].files[0].sha256
    assert list(empty.iterdir()) == []  # nothing written into the data root
    # a second resolve finds the cached copy without downloading
    monkeypatch.setattr(corpora, "_download", lambda *a: pytest.fail("downloaded twice"))
    assert resolve_corpus("tinyshakespeare").splits["val"].path == path


def test_download_checks_the_checksum(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("hello\n")
    dest = tmp_path / "out" / "file.txt"
    with pytest.raises(OSError, match="sha256"):
        corpora._download(src.as_uri(), dest, "0" * 64)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left
    corpora._download(src.as_uri(), dest, hashlib.sha256(b"hello\n").hexdigest())
    assert dest.read_text() == "hello\n"


def test_read_text_errors(tmp_path, write_file):
    with pytest.raises(FileNotFoundError, match=r"text file .*missing.txt does not exist"):
        read_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"file .*empty.txt is empty"):
        read_text(write_file("empty.txt", b""))
    # valid UTF-8 with NUL characters: named as such, not as an encoding error
    with pytest.raises(
        ValueError, match=r"model.bin holds 1 NUL character \(U\+0000, the first at"
    ):
        read_text(write_file("model.bin", b"abcd\x00\x01\x02"))
    with pytest.raises(
        ValueError, match=r"blob.bin is not UTF-8 text \(byte offset 5\) and holds NUL bytes"
    ):
        read_text(write_file("blob.bin", b"abcd\x00\xff\x02"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte offset 3\)"):
        read_text(write_file("latin1.txt", "caf\xe9 au lait".encode("latin-1")))


def test_read_text_newlines_are_universal(write_file):
    assert read_text(write_file("crlf.txt", b"a\r\nb\rc\n")) == "a\nb\nc\n"


def test_local_corpus_without_val_splits_train():
    corpus = local_corpus("train.txt")
    assert corpus.splits["train"] == SplitSource(Path("train.txt"), 0.0, 0.9)
    assert corpus.splits["val"] == SplitSource(Path("train.txt"), 0.9, 1.0)
    assert "test" not in corpus.splits
    corpus = local_corpus("a.txt", "b.txt", "c.txt")
    assert [s.path.name for s in corpus.splits.values()] == ["a.txt", "b.txt", "c.txt"]


TRICKY = "first line\n\n  indented \t\nünïcödé 日本語 😀\r\nno newline at the end"


@pytest.mark.parametrize("start,stop", [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.31, 0.77)])
def test_load_split_recovers_the_exact_text(write_file, start, stop):
    path = write_file("tricky.txt", TRICKY)
    text = read_text(path)
    a, b = SplitSource(path, start, stop).char_range(len(text))
    ds = load_split(SplitSource(path, start, stop))
    assert "".join(ds["text"]) == text[a:b]


def test_load_split_on_tinyshakespeare(data_dir, shakespeare_text):
    corpus = resolve_corpus("tinyshakespeare")
    n = len(shakespeare_text)
    train = load_split(corpus.splits["train"], num_chars=n)
    val = load_split(corpus.splits["val"], num_chars=n)
    assert "".join(train["text"]) == shakespeare_text[:1_003_854]
    assert "".join(val["text"]) == shakespeare_text[1_003_854:]


def test_load_split_writes_only_into_the_cache(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_CACHE_DIR", str(tmp_path / "cache"))
    before = sorted(p.name for p in (data_dir / "wikitext-2").iterdir())
    load_split(SplitSource(data_dir / "wikitext-2" / "valid.txt"))
    assert sorted(p.name for p in (data_dir / "wikitext-2").iterdir()) == before
    assert (tmp_path / "cache" / "datasets").is_dir()
