"""Find, download, validate and load the text corpora (named benchmarks or local files).

The data root (``$LMKIT_DATA_DIR``, default ``data/``) is only ever read: downloads, the
``datasets`` cache and lmkit's token caches live under :func:`cache_root`.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import datasets

DOWNLOAD_TIMEOUT_S = 10.0


def data_root() -> Path:
    """The folder the named corpora are looked up in: ``$LMKIT_DATA_DIR`` or ``data/``."""
    value = os.environ.get("LMKIT_DATA_DIR")
    if not value:
        return Path("data")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"LMKIT_DATA_DIR={value} is not an existing directory; create it or point "
            "LMKIT_DATA_DIR at the folder that holds the corpora (e.g. tinyshakespeare/input.txt)."
        )
    return root


def cache_root() -> Path:
    """Where lmkit writes downloads, tokenizers and token ids: ``$LMKIT_CACHE_DIR`` or
    ``~/.cache/lmkit``. Never inside the data root, which may be read-only."""
    value = os.environ.get("LMKIT_CACHE_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "lmkit"


@dataclass(frozen=True)
class CorpusFile:
    """One file of a named corpus: where it sits under the data root and how to check it."""

    relpath: str  # relative to the data root, e.g. "tinyshakespeare/input.txt"
    sha256: str
    url: str


@dataclass(frozen=True)
class SplitRule:
    """A split is the characters [start, stop) (as fractions of the file) of one file."""

    file: str  # a CorpusFile.relpath, or a local path for data=text
    start: float = 0.0
    stop: float = 1.0


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    files: tuple[CorpusFile, ...]
    splits: dict[str, SplitRule]


@dataclass(frozen=True)
class SplitSource:
    """Where the text of one split comes from: characters [start, stop) of ``path``."""

    path: Path
    start: float = 0.0
    stop: float = 1.0

    def char_range(self, num_chars: int) -> tuple[int, int]:
        """The cut as nanoGPT makes it: ``data[: int(n * 0.9)]`` / ``data[int(n * 0.9) :]``."""
        return int(num_chars * self.start), int(num_chars * self.stop)


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: the files on disk for each split ("train", "val", optionally "test")."""

    name: str
    splits: dict[str, SplitSource]


_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
_WIKITEXT_URL = (
    "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
    "word_language_model/data/wikitext-2/{}.txt"
)
# The 90/10 character split of nanoGPT's shakespeare_char (train 1,003,854 / val 111,540 chars).
TRAIN_FRACTION = 0.9

CORPORA: dict[str, CorpusSpec] = {
    "tinyshakespeare": CorpusSpec(
        name="tinyshakespeare",
        files=(
            CorpusFile(
                "tinyshakespeare/input.txt",
                "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                _SHAKESPEARE_URL,
            ),
        ),
        splits={
            "train": SplitRule("tinyshakespeare/input.txt", 0.0, TRAIN_FRACTION),
            "val": SplitRule("tinyshakespeare/input.txt", TRAIN_FRACTION, 1.0),
        },
    ),
    "wikitext2": CorpusSpec(
        name="wikitext2",
        files=(
            CorpusFile(
                "wikitext-2/train.txt",
                "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                _WIKITEXT_URL.format("train"),
            ),
            CorpusFile(
                "wikitext-2/valid.txt",
                "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                _WIKITEXT_URL.format("valid"),
            ),
            CorpusFile(
                "wikitext-2/test.txt",
                "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                _WIKITEXT_URL.format("test"),
            ),
        ),
        splits={
            "train": SplitRule("wikitext-2/train.txt"),
            "val": SplitRule("wikitext-2/valid.txt"),
            "test": SplitRule("wikitext-2/test.txt"),
        },
    ),
}


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, dest: Path, sha256: str) -> None:
    """Fetch ``url`` into ``dest`` (atomically), checking its sha256; raises OSError on failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.sha256()
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r,
        ):
            for chunk in iter(lambda: r.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise OSError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _find_or_download(corpus: str, file: CorpusFile) -> Path:
    local = data_root() / file.relpath
    if local.is_file():
        actual = sha256_of(local)
        if actual != file.sha256:
            warnings.warn(
                f"{local} has sha256 {actual}, not the {file.sha256} of the published "
                f"'{corpus}'; results will not be comparable with other runs on '{corpus}'.",
                stacklevel=3,
            )
        return local
    cached = cache_root() / "corpora" / file.relpath
    if cached.is_file() and sha256_of(cached) == file.sha256:
        return cached
    try:
        _download(file.url, cached, file.sha256)
    except Exception as e:  # any failure (offline, timeout, checksum) ends in the same advice
        raise FileNotFoundError(
            f"corpus '{corpus}' needs {local.resolve()} (sha256 {file.sha256}) and downloading "
            f"it from {file.url} failed ({type(e).__name__}: {e}); put the file there, "
            "or set LMKIT_DATA_DIR to a folder that holds it."
        ) from e
    return cached


def resolve_corpus(name: str) -> Corpus:
    """Find the files of a named corpus under the data root, downloading them when missing."""
    if name not in CORPORA:
        raise ValueError(
            f"unknown corpus {name!r}; choose one of {sorted(CORPORA)} or use data=text with "
            "data.train=path/to/train.txt"
        )
    spec = CORPORA[name]
    paths = {f.relpath: _find_or_download(name, f) for f in spec.files}
    return Corpus(
        name,
        {s: SplitSource(paths[r.file], r.start, r.stop) for s, r in spec.splits.items()},
    )


def local_corpus(
    train: str | Path, val: str | Path | None = None, test: str | Path | None = None
) -> Corpus:
    """A corpus of local text files (data=text); without ``val`` the last 10% of train is val."""
    if val is None:
        splits = {
            "train": SplitSource(Path(train), 0.0, TRAIN_FRACTION),
            "val": SplitSource(Path(train), TRAIN_FRACTION, 1.0),
        }
    else:
        splits = {"train": SplitSource(Path(train)), "val": SplitSource(Path(val))}
    if test is not None:
        splits["test"] = SplitSource(Path(test))
    return Corpus("text", splits)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, as Python's text mode and ``datasets`` see it.

    Newlines are universal: ``\\r\\n`` and ``\\r`` become ``\\n``. Raises FileNotFoundError for
    a missing file and ValueError (one sentence saying what is wrong) for a file that is empty or
    holds no visible text (only whitespace, control or invisible format characters), is not
    UTF-8 (e.g. UTF-16 or Latin-1), or holds NUL characters (valid UTF-8, but never in text: a
    binary file, or UTF-16 text without a byte-order mark).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"text file {path} does not exist (looked in {path.resolve()}); check the path."
        )
    data = path.read_bytes()
    if not data:
        raise ValueError(f"file {path} is empty; give a file that holds the text to model.")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(
            f"file {path} is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; "
            "convert it first (e.g. iconv -f UTF-16 -t UTF-8)."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        binary = " and holds NUL bytes: it looks like a binary file" if b"\0" in data else ""
        raise ValueError(
            f"file {path} is not UTF-8 text (byte offset {e.start}){binary}; give a plain text "
            "file or convert it first (e.g. iconv -t UTF-8)."
        ) from None
    nul = data.find(b"\0")
    if nul >= 0:
        count = data.count(b"\0")
        what = "1 NUL character" if count == 1 else f"{count} NUL characters"
        raise ValueError(
            f"file {path} holds {what} (U+0000, the first at byte offset {nul}), which text "
            "never has: it is a binary file or UTF-16 text (iconv -f UTF-16 -t UTF-8 converts "
            "that); if the rest is the text to model, delete the NULs first (tr -d '\\000')."
        )
    if _VISIBLE.search(text) is None:
        raise ValueError(
            f"file {path} is empty: its {len(text)} characters are all whitespace or invisible; "
            "give a file that holds the text to model."
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


# A character that shows: not whitespace, not a C0/C1 control, not an invisible format character
# (soft hyphen, zero-width space/joiners, direction marks, word joiner, byte-order mark, ...).
_VISIBLE = re.compile(
    r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff]"
)


def load_split(source: SplitSource, *, num_chars: int | None = None) -> datasets.Dataset:
    """The text of one split as a ``datasets.Dataset`` of lines that keep their ``\\n``.

    ``"".join(rows)`` is exactly the split's text (``read_text`` cut by ``char_range``).
    ``num_chars`` (the file's length in characters) checks that; it is computed when omitted.
    The ``datasets`` cache goes under ``cache_root()/datasets``.
    """
    import datasets
    import pyarrow.compute as pc

    cache_dir = cache_root() / "datasets"
    ds = datasets.load_dataset(
        "text",
        data_files={"text": str(source.path)},
        split="text",
        sample_by="line",
        keep_linebreaks=True,
        cache_dir=str(cache_dir),
    )
    lengths = pc.utf8_length(ds.data.column("text")).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths, dtype=np.int64)  # [rows] end character of each line
    total = int(ends[-1]) if len(ends) else 0
    if num_chars is None:
        num_chars = len(read_text(source.path))
    if total != num_chars:
        raise RuntimeError(
            f"datasets read {total} characters from {source.path} but the file has {num_chars}; "
            "this is a bug in lmkit's data path, please report it."
        )
    if (source.start, source.stop) == (0.0, 1.0):
        return ds
    a, b = source.char_range(num_chars)
    starts = ends - lengths
    first = int(np.searchsorted(ends, a, side="right"))  # first line that ends after a
    last = int(np.searchsorted(starts, b, side="left"))  # lines [first, last) start before b

    def cut(batch: dict, indices: list[int]) -> dict:
        texts = []
        for text, i in zip(batch["text"], indices, strict=True):
            s = int(starts[first + i])
            texts.append(text[max(a - s, 0) : b - s])
        return {"text": texts}

    return ds.select(range(first, last)).map(
        cut,
        batched=True,
        with_indices=True,
        keep_in_memory=True,
        new_fingerprint=hashlib.sha256(f"{ds._fingerprint}-{a}-{b}".encode()).hexdigest()[:32],
        desc=f"cutting characters [{a}, {b})",
    )
