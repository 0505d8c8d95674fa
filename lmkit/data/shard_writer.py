"""Tokenize a document source once into shards of token ids, in parallel and in bounded memory,
resumably.

Layout of a shard cache (``$LMKIT_CACHE_DIR/shards/<fingerprint>/``):

- ``tokenizer.json``: trained first, on a sample of the train split, and reused on resume;
- ``<split>-<k>.bin``: raw token ids (uint16 below 65,536 ids, else uint32), each document's
  ids followed by the end-of-text id;
- ``progress.json``: the finished shards and, per source split, how many documents they hold;
  a killed preparation keeps them and continues from there;
- ``manifest.json``: written last, its presence marks a complete cache: shards, tokens, bytes,
  words and documents per split, the tokenizer, the source and the fingerprint.

Worker processes encode batches of documents; the main process reads the source, keeps at most
``2 x workers`` batches in flight and appends the results to the open shards on disk, so memory
stays bounded by the batches in flight whatever the corpus size.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.data.hf_source import SPLITS, HFSource
from lmkit.data.shard_encode import encode_documents, start_worker
from lmkit.data.tokenizers import Tokenizer, train_tokenizer
from lmkit.files import atomic_write

log = logging.getLogger(__name__)


@dataclass
class PrepareOptions:
    shard_tokens: int = 50_000_000  # tokens per shard file (100 MB of uint16)
    batch_documents: int = 256  # documents per worker task
    workers: int | None = None  # processes that encode; None: one per CPU core
    tokenizer_sample_bytes: int = 100_000_000  # train text the tokenizer is trained on

    def num_workers(self) -> int:
        if self.workers is not None:
            return max(1, int(self.workers))
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


# ---- the main process's side ----------------------------------------------------------------


@dataclass
class OpenShard:
    """The shard being written for one split: a .part file that becomes .bin when closed."""

    split: str
    index: int
    path: Path
    file: Any = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"tokens": 0, "bytes": 0, "words": 0, "documents": 0}
    )

    def write(self, result: dict[str, Any]) -> None:
        if self.file is None:
            self.file = open(self.path.with_suffix(".part"), "wb")
        self.file.write(result["ids"])
        for key in self.counts:
            self.counts[key] += result[key]

    def close(self) -> dict[str, Any] | None:
        """Flush, sync and rename to .bin; the shard's record (None when nothing was written)."""
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.path.with_suffix(".part"), self.path)
        return {"file": self.path.name, **self.counts}


class ShardPreparation:
    """One preparation of ``source`` into ``cache_dir`` with a trained tokenizer."""

    def __init__(
        self,
        source: HFSource,
        cache_dir: Path,
        tokenizer_config: dict[str, Any],
        options: PrepareOptions,
        fingerprint: str,
    ) -> None:
        self.source, self.cache_dir, self.options = source, cache_dir, options
        self.tokenizer_config, self.fingerprint = tokenizer_config, fingerprint
        self.progress: dict[str, Any] = {"documents_done": {}, "shards": {s: [] for s in SPLITS}}

    def run(self) -> dict[str, Any]:
        """Prepare (or finish preparing) the cache; returns the manifest."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._load_progress()
        tokenizer = self._tokenizer()
        dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
        sources = list(dict.fromkeys(self._source_order()))
        for source_split in sources:
            self._prepare_source(source_split, tokenizer, dtype)
        return self._write_manifest(tokenizer, dtype)

    # ---- the tokenizer --------------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        path = self.cache_dir / "tokenizer.json"
        if path.is_file():  # resuming: the shards written so far used it
            return Tokenizer.load(path)
        kind, vocab_size = self.tokenizer_config["kind"], self.tokenizer_config.get("vocab_size")
        sample = list(self._tokenizer_sample(kind))
        if not any(t.strip() for t in sample):
            raise ValueError(
                f"the train split of {self.source.path} has no text in column "
                f"{self.source.text_column!r} (its documents are empty or whitespace); "
                "check data.text_column and the source"
            )
        size = sum(len(t) for t in sample)
        log.info("training a %s tokenizer on %d documents (%d characters)", kind, len(sample), size)
        tokenizer = train_tokenizer(kind, sample, vocab_size=vocab_size, end_of_text=True)
        atomic_write(path, tokenizer.to_json().encode())
        return tokenizer

    def _tokenizer_sample(self, kind: str) -> Iterator[str]:
        """The first ``tokenizer_sample_bytes`` of train documents (char: of every split, so
        that a character only val has is in the vocabulary, as for data=text)."""
        budget = self.options.tokenizer_sample_bytes
        plan = self.source.split_plan()
        wanted = ["train", "val", "test"] if kind == "char" else ["train"]
        for split in wanted:
            if split not in plan:
                continue
            code, taken = SPLITS.index(split), 0
            for first, texts in self.source.batches(plan[split], self.options.batch_documents):
                targets = self.source.assign(plan[split], first, len(texts))
                for text, target in zip(texts, targets, strict=True):
                    if target == code and text:
                        yield text
                        taken += len(text.encode())
                if taken >= budget:
                    break

    # ---- the shards -----------------------------------------------------------------------

    def _source_order(self) -> list[str]:
        """Source splits, the ones that only feed val/test first: a split too short for a
        window then fails before the long train pass."""
        plan = self.source.split_plan()
        train_source = plan["train"]
        return [s for s in plan.values() if s != train_source] + [train_source]

    def _prepare_source(self, source_split: str, tokenizer: Tokenizer, dtype: str) -> None:
        done = self.progress["documents_done"].get(source_split)
        if done == "all":
            return
        start = int(done or 0)
        total = self.source.num_documents(source_split)
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=start,
            desc=f"tokenizing {self.source.path} [{source_split}]",
            unit="doc",
            dynamic_ncols=True,
        )
        open_shards: dict[int, OpenShard] = {}
        tokens, started = 0, time.perf_counter()
        for first, texts, result in self._encoded(source_split, tokenizer, dtype, start):
            for code, part in result.items():
                shard = open_shards.get(code) or self._open_shard(SPLITS[code])
                open_shards[code] = shard
                shard.write(part)
                tokens += part["tokens"]
            position = first + len(texts)
            bar.update(len(texts))
            rate = tokens / (time.perf_counter() - started)
            bar.set_postfix(tokens_per_s=f"{rate:,.0f}", refresh=False)
            if any(s.counts["tokens"] >= self.options.shard_tokens for s in open_shards.values()):
                self._checkpoint(source_split, position, open_shards)
                open_shards = {}
        bar.close()
        self._checkpoint(source_split, "all", open_shards)

    def _encoded(
        self, source_split: str, tokenizer: Tokenizer, dtype: str, start: int
    ) -> Iterator[tuple[int, list[str], dict[int, dict[str, Any]]]]:
        """(first document, texts, encode_documents' result) in document order, encoded by a
        pool of workers with at most 2 x workers batches in flight (or in this process)."""
        batches = self.source.batches(source_split, self.options.batch_documents, start)
        workers = self.options.num_workers()
        if workers == 1:
            start_worker(tokenizer.to_json(), dtype)
            for first, texts in batches:
                targets = self.source.assign(source_split, first, len(texts))
                yield first, texts, encode_documents(texts, targets)
            return
        with worker_pool(workers, tokenizer.to_json(), dtype) as pool:
            pending: deque = deque()
            for first, texts in batches:
                targets = self.source.assign(source_split, first, len(texts))
                pending.append((first, texts, pool.apply_async(encode_documents, (texts, targets))))
                if len(pending) >= 2 * workers:
                    first, texts, result = pending.popleft()
                    yield first, texts, result.get()
            while pending:
                first, texts, result = pending.popleft()
                yield first, texts, result.get()

    def _open_shard(self, split: str) -> OpenShard:
        index = len(self.progress["shards"][split])
        return OpenShard(split, index, self.cache_dir / f"{split}-{index:05d}.bin")

    def _checkpoint(self, source_split: str, done: int | str, shards: dict) -> None:
        """Close the open shards and record them with the documents they hold, atomically: a
        kill before this point redoes these documents, never loses or repeats them."""
        for shard in shards.values():
            record = shard.close()
            if record is not None:
                self.progress["shards"][shard.split].append(record)
        self.progress["documents_done"][source_split] = done
        atomic_write(self.cache_dir / "progress.json", json.dumps(self.progress).encode())

    def _load_progress(self) -> None:
        for stray in self.cache_dir.glob("*.part"):  # a killed run's unfinished shards
            stray.unlink()
        path = self.cache_dir / "progress.json"
        if path.is_file():
            self.progress = json.loads(path.read_text())
            finished = sum(len(v) for v in self.progress["shards"].values())
            log.info("resuming the preparation in %s: %d shards are done", self.cache_dir, finished)
            known = {r["file"] for rs in self.progress["shards"].values() for r in rs}
            for orphan in self.cache_dir.glob("*.bin"):  # renamed but not yet recorded
                if orphan.name not in known:
                    orphan.unlink()

    # ---- the manifest ---------------------------------------------------------------------

    def _write_manifest(self, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
        token_bytes = tokenizer.token_bytes
        splits: dict[str, Any] = {}
        for split in self.source.split_plan():
            shards = self.progress["shards"][split]
            totals = {k: sum(r[k] for r in shards) for k in ("tokens", "bytes", "words")}
            first = _first_token(self.cache_dir, shards, dtype)
            splits[split] = {
                "shards": shards,
                **totals,
                "documents": sum(r["documents"] for r in shards),
                # the first token of a split is never a target
                "scored_bytes": totals["bytes"] - (int(token_bytes[first]) if shards else 0),
            }
        manifest = {
            "fingerprint": self.fingerprint,
            "source": self.source.fingerprint_key(),
            "tokenizer": {**self.tokenizer_config, "eot_id": tokenizer.eot_id},
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype,
            "splits": splits,
            # the keys every token data module reads
            "tokens": {s: v["tokens"] for s, v in splits.items()},
            "scored_bytes": {s: v["scored_bytes"] for s, v in splits.items()},
        }
        atomic_write(self.cache_dir / "manifest.json", json.dumps(manifest, indent=2).encode())
        return manifest


def worker_pool(workers: int, tokenizer_json: str, dtype: str) -> Any:
    """Processes forked from a server that imported only the worker's module: a fork of this
    process would copy its heap (torch, Lightning: hundreds of MB) page by page into every worker
    as Python touches it, and spawn would import the calling script (seconds per worker)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["lmkit.data.shard_encode"])
    # a new worker imports the parent's __main__ (scripts/train.py: Lightning) unless that
    # module's spec names it __main__; the workers need nothing from it
    main = sys.modules["__main__"]
    spec = main.__spec__
    if spec is None:
        main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    try:
        return context.Pool(workers, start_worker, (tokenizer_json, dtype))
    finally:
        main.__spec__ = spec


def _first_token(cache_dir: Path, shards: list[dict[str, Any]], dtype: str) -> int:
    for record in shards:
        if record["tokens"]:
            return int(np.fromfile(cache_dir / record["file"], dtype=dtype, count=1)[0])
    return 0


def read_manifest(cache_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of a complete, consistent shard cache, else None."""
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        if manifest["fingerprint"] != fingerprint:
            return None
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in manifest["splits"].values():
            for record in split["shards"]:
                if (cache_dir / record["file"]).stat().st_size != record["tokens"] * itemsize:
                    return None
    except (OSError, ValueError, KeyError):
        return None
    return manifest
