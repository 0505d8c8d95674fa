"""Documents from anything ``datasets.load_dataset`` reads: a hub dataset (``path`` + ``name``)
or local ``parquet`` / ``json`` (jsonl) / ``csv`` / ``text`` files through ``data_files``
(globs), optionally streamed.

Each lmkit split (train, val, test) is a named split of the source, or documents held out from
the train split: a seeded fraction (streaming or not) or a seeded number of documents (not
streaming). Every check that can fail in a second (globs, encodings, the column, an
unreachable hub name) runs in :meth:`HFSource.open`, before any tokenization.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.data.corpora import cache_root

BUILDERS = {"parquet": "parquet", "json": "json", "jsonl": "json", "csv": "csv", "text": "text"}
TEXT_BUILDERS = ("json", "csv", "text")  # files that must be UTF-8
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Holdout:
    """Documents of the train source that go to val or test instead: a fraction in (0, 1) or a
    number of documents (an int >= 1), chosen by a seeded hash of each document's index."""

    val: float | int = 0
    test: float | int = 0
    seed: int = 0


def builder_of(path: str) -> str | None:
    """The ``datasets`` builder for a file format name (jsonl -> json), else None (a hub name)."""
    return BUILDERS.get(path)


@dataclass(eq=False)  # hashed by identity (the ranks cache)
class HFSource:
    """Where each lmkit split's documents come from; see the module doc."""

    path: str
    name: str | None = None
    data_files: Any = None  # a glob, a list of globs, or {source split: glob(s)}
    revision: str | None = None
    text_column: str = "text"
    train_split: str = "train"
    val_split: str | None = None  # a named split of the source; None: held out from train
    test_split: str | None = None  # a named split; None: held out when holdout.test > 0
    holdout: Holdout = Holdout()
    streaming: bool = False

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(
                "data=hf needs data.path: a hub dataset (e.g. roneneldan/TinyStories) or a file "
                "format (parquet, json, csv, text) with data.data_files=path/or/glob"
            )
        self._datasets: dict[str, Any] | None = None

    # ---- what the splits are ------------------------------------------------------------

    def split_plan(self) -> dict[str, str]:
        """{lmkit split: source split} for each lmkit split that exists."""
        plan = {"train": self.train_split}
        plan["val"] = self.val_split or self.train_split
        if self.test_split or self.holdout.test:
            plan["test"] = self.test_split or self.train_split
        return plan

    def held_out(self) -> dict[str, float | int]:
        """{lmkit split: fraction or count} of the splits held out from the train source."""
        out = {}
        if self.val_split is None:
            out["val"] = self.holdout.val
        if self.test_split is None and self.holdout.test:
            out["test"] = self.holdout.test
        return out

    def fingerprint_key(self) -> dict[str, Any]:
        """What the documents of each split depend on (local files by size and mtime)."""
        files = {
            split: [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
            for split, paths in self.local_files().items()
        }
        return {
            "path": self.path,
            "name": self.name,
            "revision": self.revision,
            "files": files,
            "text_column": self.text_column,
            "splits": self.split_plan(),
            "held_out": self.held_out(),
            "holdout_seed": self.holdout.seed,
        }

    # ---- checks -----------------------------------------------------------------------------

    def check_options(self) -> None:
        """The options alone (no file or network access)."""
        held = self.held_out()
        for split, amount in held.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise ValueError(
                    f"holdout {split}={amount!r} must be a fraction in (0, 1) or a number of "
                    "documents"
                )
            if isinstance(amount, float) and amount >= 1:
                raise ValueError(
                    f"holdout {split}={amount} is a fraction, so it must be below 1; give a "
                    f"number of documents as an integer (e.g. {int(amount)})"
                )
            if isinstance(amount, int) and amount and self.streaming:
                raise ValueError(
                    f"holdout {split}={amount} documents needs the source's length, which a "
                    f"streamed source does not know; give a fraction (e.g. 0.01) or "
                    "streaming=false"
                )
        if held.get("val") == 0:
            raise ValueError(
                "no val split: give data.val_split (a split of the source, e.g. validation) "
                "or hold documents out of train with data.holdout.val (e.g. 0.01)"
            )
        fractions = [a for a in held.values() if isinstance(a, float)]
        if sum(fractions) >= 1:
            raise ValueError(f"the held-out fractions {held} leave no train documents")

    def local_files(self) -> dict[str, list[Path]]:
        """{source split: the local files its data_files patterns match}; raises ValueError for
        a pattern that matches nothing."""
        if self.data_files is None:
            return {}
        spec = self.data_files
        if not isinstance(spec, dict):
            spec = {"train": spec}
        out = {}
        for split, patterns in spec.items():
            patterns = [patterns] if isinstance(patterns, str) else list(patterns)
            paths: list[Path] = []
            for pattern in patterns:
                matched = sorted(glob.glob(os.path.expanduser(str(pattern)), recursive=True))
                if not matched:
                    raise ValueError(
                        f"data.data_files pattern {pattern!r} matches no file (relative paths "
                        f"are read from {Path.cwd()}); check the path or glob"
                    )
                paths += [Path(p).resolve() for p in matched]
            out[split] = paths
        return out

    def check_files(self, encodings: bool = True) -> None:
        """A file format comes with data_files and its globs match; with ``encodings``, local
        text-like files must also be UTF-8 throughout (one pass over them, in 1 MB chunks)."""
        builder = builder_of(self.path)
        if builder is None and self.data_files is None:
            return
        if builder is None:
            raise ValueError(
                f"data.path={self.path!r} is not a file format; with data.data_files give "
                f"path=parquet, json, csv or text"
            )
        files = self.local_files()
        if not files:
            raise ValueError(
                f"data.path={self.path} reads local files: give data.data_files=path/or/glob"
            )
        if encodings and builder in TEXT_BUILDERS:
            for paths in files.values():
                for path in paths:
                    check_utf8(path)

    # ---- loading ----------------------------------------------------------------------------

    def open(self) -> None:
        """Check the options and files, load the source splits and check the text column."""
        self.check_options()
        self.check_files()
        builder = builder_of(self.path)
        files = self.local_files()
        kwargs: dict[str, Any] = {
            "cache_dir": str(cache_root() / "datasets"),
            "streaming": self.streaming,
        }
        if files:
            kwargs["data_files"] = {s: [str(p) for p in ps] for s, ps in files.items()}
        if self.name is not None:
            kwargs["name"] = self.name
        if self.revision is not None:
            kwargs["revision"] = self.revision
        import datasets

        try:
            loaded = datasets.load_dataset(builder or self.path, **kwargs)
        except Exception as e:  # unreachable hub, unknown name, unreadable files: one line
            raise ValueError(load_error(self.path, builder, e)) from e
        needed = set(self.split_plan().values())
        missing = needed - set(loaded)
        if missing:
            raise ValueError(
                f"{self.path} has no split(s) {sorted(missing)}; its splits are {sorted(loaded)} "
                "(set data.train_split / data.val_split / data.test_split to those)"
            )
        self._datasets = {s: loaded[s] for s in needed}
        for split, ds in self._datasets.items():
            self._check_column(split, ds)

    def _check_column(self, split: str, ds: Any) -> None:
        columns = ds.column_names
        if columns is None:  # a streamed source may only know its columns from a row
            first = next(iter(ds), None)
            columns = list(first) if first is not None else []
            if first is None:
                raise ValueError(f"split {split!r} of {self.path} has no documents")
        if self.text_column not in columns:
            raise ValueError(
                f"{self.path} split {split!r} has no column {self.text_column!r}; its columns "
                f"are {columns}: set data.text_column to the one that holds the text"
            )
        if not self.streaming and len(ds) == 0:
            raise ValueError(f"split {split!r} of {self.path} has no documents")

    def num_documents(self, source_split: str) -> int | None:
        ds = self._opened()[source_split]
        return None if self.streaming else len(ds)

    def batches(
        self, source_split: str, batch_size: int, start: int = 0
    ) -> Iterator[tuple[int, list[str]]]:
        """(index of the first document, texts) batches of a source split from document
        ``start`` on; missing texts (None) are empty strings."""
        ds = self._opened()[source_split]
        if self.streaming:
            ds = ds.select_columns([self.text_column]).skip(start)
        else:
            ds = ds.select_columns([self.text_column])
            if start:
                ds = ds.select(range(start, len(ds)))
        index = start
        for batch in ds.iter(batch_size=batch_size):
            texts = [t if t is not None else "" for t in batch[self.text_column]]
            yield index, texts
            index += len(texts)

    def assign(self, source_split: str, first: int, count: int) -> np.ndarray:
        """[count] index into SPLITS (0 train, 1 val, 2 test) of documents first..first+count-1
        of a source split: train's held-out documents go to val or test, seeded."""
        plan = self.split_plan()
        targets = [SPLITS.index(s) for s, src in plan.items() if src == source_split]
        if source_split != self.train_split or len(targets) == 1:
            return np.full(count, targets[0], dtype=np.int8)
        out = np.zeros(count, dtype=np.int8)
        index = np.arange(first, first + count, dtype=np.uint64)
        u = uniform_hash(self.holdout.seed, index)
        held = self.held_out()
        counts = {s: a for s, a in held.items() if isinstance(a, int) and not isinstance(a, bool)}
        if counts:
            ranks = self._count_ranks(source_split)[first : first + count]
        low = 0.0
        for split in ("val", "test"):
            amount = held.get(split)
            if not amount:
                continue
            code = SPLITS.index(split)
            if split in counts:
                offset = counts.get("val", 0) if split == "test" else 0
                out[(ranks >= offset) & (ranks < offset + amount)] = code
            else:
                out[(u >= low) & (u < low + amount)] = code
                low += amount
        return out

    @functools.cache  # noqa: B019 (one per source, which lives as long as its preparation)
    def _count_ranks(self, source_split: str) -> np.ndarray:
        """A seeded permutation rank of every document: the lowest ranks are held out."""
        n = self.num_documents(source_split)
        order = np.random.default_rng([self.holdout.seed, n]).permutation(n)
        ranks = np.empty(n, dtype=np.int64)
        ranks[order] = np.arange(n)
        return ranks

    def _opened(self) -> dict[str, Any]:
        if self._datasets is None:
            self.open()
        return self._datasets


def uniform_hash(seed: int, index: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per document index (splitmix64 of seed and index): the same
    document goes to the same split whatever the batch size, streamed or not."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def check_utf8(path: Path) -> None:
    """Raise ValueError naming the file and byte offset where it stops being UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"file {path} is not UTF-8 throughout (byte offset {offset + e.start}: "
                    f"{chunk[e.start : e.start + 4]!r}); it mixes encodings: convert it first "
                    "(e.g. iconv -f latin1 -t utf-8) or drop the bad rows"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"file {path} ends inside a UTF-8 character: truncated?") from None


def load_error(path: str, builder: str | None, error: Exception) -> str:
    what = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if builder is not None:
        return f"datasets could not read the {builder} files of data.data_files ({what})"
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    hint = (
        "this process is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
        if offline
        else "check the name, and the network or a cache that holds it"
    )
    return (
        f"could not load hub dataset {path!r} ({what}); {hint}: run once where the hub is "
        "reachable (the download is cached), or download its files and use "
        "data.path=parquet|json|csv|text data.data_files=..."
    )


def fingerprint(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
