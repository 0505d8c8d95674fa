"""TextDataModule: corpus files -> tokenizer -> cached token ids -> train/val/test batches.

Training batches are random windows drawn from a generator seeded by (seed, step, rank): the
batch of step ``s`` is a pure function of them, so a resumed run continues the same data order.
Evaluation covers a split in order, scoring every token after the first exactly once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lmkit.data.corpora import (
    CORPORA,
    Corpus,
    cache_root,
    load_split,
    local_corpus,
    read_text,
    resolve_corpus,
    sha256_of,
)
from lmkit.data.shards import ShardedTokens
from lmkit.data.token_cache import (
    ENCODE_BATCH_LINES,
    cache_fingerprint,
    encode,
    log_unseen_chars,
    read_meta,
    unseen_chars,
)
from lmkit.data.token_datamodule import TokenDataModule
from lmkit.data.tokenizers import Tokenizer, check_tokenizer_config, train_tokenizer
from lmkit.evaluation import count_words
from lmkit.files import atomic_write

log = logging.getLogger(__name__)


class TextDataModule(TokenDataModule):
    """Language-modelling data from a named corpus or local text files.

    Give either ``corpus`` ("tinyshakespeare", "wikitext2") or a ``train`` file (plus optional
    ``val``/``test``; without ``val`` the last 10% of train's characters are val). ``tokenizer``
    is ``{"kind": "char" | "bpe" | "word", "vocab_size": int}`` (default char; vocab_size is
    for bpe only). ``max_steps`` (optimizer
    steps) sizes the train loader: ``max_steps * accumulate_grad_batches`` batches, unbounded
    when None or -1.

    After :meth:`prepare`: ``tokenizer``, ``vocab_size``, ``split_names``, ``ids`` (a read-only
    ``np.memmap`` per split) and :meth:`scored_bytes` for bits per byte.

    The char vocabulary is the characters of every split (nanoGPT's is the whole file's), so
    any UTF-8 text trains even when val or test has a character that train lacks; such
    characters are scored like any other (the model never saw them as a target) and their count
    per split is logged at preparation and kept in ``meta["unseen_chars"]``.
    """

    def __init__(
        self,
        corpus: str | None = None,
        *,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        tokenizer: Mapping[str, Any] | None = None,
        block_size: int = 256,
        batch_size: int = 12,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        max_steps: int | None = None,
    ) -> None:
        super().__init__(
            block_size=block_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            max_steps=max_steps,
        )
        check_sources(corpus, train, val, test)
        tokenizer = dict(tokenizer) if tokenizer is not None else {"kind": "char"}
        unknown = set(tokenizer) - {"kind", "vocab_size"}
        if unknown:
            raise ValueError(
                f"tokenizer options {sorted(unknown)} are unknown; use kind and vocab_size only"
            )
        self.tokenizer_kind = tokenizer.get("kind", "char")
        self.tokenizer_vocab_size = tokenizer.get("vocab_size")
        check_tokenizer_config(self.tokenizer_kind, self.tokenizer_vocab_size)
        self.corpus_name, self.train_file, self.val_file, self.test_file = corpus, train, val, test
        self.cache_dir: Path | None = None

    def prepare(self) -> None:
        """Resolve and check the files, train the tokenizer and encode every split, or load
        all of it from the cache. Idempotent; cheap when cached; needs no Trainer."""
        if self.tokenizer is not None:
            return
        corpus = self._corpus()
        texts = {path: read_text(path) for path in {s.path for s in corpus.splits.values()}}
        shas = {path: sha256_of(path) for path in texts}
        tok = {"kind": self.tokenizer_kind, "vocab_size": self.tokenizer_vocab_size}
        fingerprint = cache_fingerprint(corpus, shas, tok)
        cache_dir = cache_root() / "tokens" / fingerprint
        meta = read_meta(cache_dir, fingerprint)
        if meta is None:
            # Tokens never outnumber characters (char, word) or bytes (byte-level BPE): an upper
            # bound that rejects an impossible block_size before any tokenizer is trained.
            bound = {}
            per_char = self.tokenizer_kind in ("char", "word")
            for split, source in corpus.splits.items():
                a, b = source.char_range(len(texts[source.path]))
                piece = texts[source.path][a:b]
                bound[split] = len(piece) if per_char else len(piece.encode())
            self._check_block_size(bound)
            meta = self._build_cache(corpus, texts, shas, tok, fingerprint, cache_dir)
            self.cache_hit = False
        else:
            self.cache_hit = True
        self._check_block_size(meta["tokens"])

        self.meta, self.cache_dir = meta, cache_dir
        if self.tokenizer_kind == "char":
            if "unseen_chars" not in meta:  # a cache written before it was counted
                ids = {
                    s: np.memmap(cache_dir / f"{s}.bin", dtype=meta["dtype"], mode="r")
                    for s in meta["tokens"]
                }
                meta["unseen_chars"] = unseen_chars(
                    Tokenizer.load(cache_dir / "tokenizer.json"), ids
                )
            log_unseen_chars(meta["unseen_chars"], corpus.name)
        self.split_names = list(meta["tokens"])
        self.split_words = {}  # the denominators of word-normalized perplexity
        for split, source in corpus.splits.items():
            text = texts[source.path]
            self.split_words[split] = count_words(text[slice(*source.char_range(len(text)))])
        self.ids = {
            split: np.memmap(cache_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
            for split in self.split_names
        }
        self.tokenizer = Tokenizer.load(cache_dir / "tokenizer.json")

    def tokens(self, split: str) -> ShardedTokens:
        return ShardedTokens([self.cache_dir / f"{split}.bin"], self.meta["dtype"])

    def _corpus(self) -> Corpus:
        if self.corpus_name is not None:
            return resolve_corpus(self.corpus_name)
        return local_corpus(self.train_file, self.val_file, self.test_file)

    def _build_cache(
        self,
        corpus: Corpus,
        texts: dict[Path, str],
        shas: dict[Path, str],
        tok: dict[str, Any],
        fingerprint: str,
        cache_dir: Path,
    ) -> dict[str, Any]:
        cache_dir.mkdir(parents=True, exist_ok=True)
        splits = {
            split: load_split(source, num_chars=len(texts[source.path]))
            for split, source in corpus.splits.items()
        }
        # char: the characters of every split, as nanoGPT's vocabulary is the whole file's, so a
        # character only val has is a token too (see lmkit.data.tokenizers); bpe and word: train
        if tok["kind"] == "char":
            vocab_splits = list(splits.values())
            log.info("training a char tokenizer on the characters of %s", corpus.name)
        else:
            vocab_splits = [splits["train"]]
            log.info("training a %s tokenizer on the train split of %s", tok["kind"], corpus.name)
        lines = (
            line
            for ds in vocab_splits
            for batch in ds.iter(batch_size=ENCODE_BATCH_LINES)
            for line in batch["text"]
        )
        tokenizer = train_tokenizer(tok["kind"], lines, vocab_size=tok["vocab_size"])
        dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
        meta: dict[str, Any] = {
            "fingerprint": fingerprint,
            "corpus": corpus.name,
            "files": {
                s: {"path": str(src.path), "sha256": shas[src.path], "chars": [src.start, src.stop]}
                for s, src in corpus.splits.items()
            },
            "tokenizer": tok,
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name,
            "tokens": {},
            "bytes": {},
            "scored_bytes": {},
        }
        token_bytes = tokenizer.token_bytes
        all_ids = {}
        for split, ds in splits.items():
            ids = all_ids[split] = encode(ds, tokenizer, split, fingerprint).astype(dtype)
            atomic_write(cache_dir / f"{split}.bin", ids.tobytes())
            meta["tokens"][split] = int(ids.size)
            meta["bytes"][split] = int(token_bytes[ids].sum())
            meta["scored_bytes"][split] = int(token_bytes[ids[1:]].sum())
        if tok["kind"] == "char":
            meta["unseen_chars"] = unseen_chars(tokenizer, all_ids)
        atomic_write(cache_dir / "tokenizer.json", tokenizer.to_json().encode())
        # meta.json last: its presence marks a complete cache
        atomic_write(cache_dir / "meta.json", json.dumps(meta, indent=2).encode())
        return meta


def check_sources(corpus: str | None, train, val, test) -> None:
    """A named corpus or local files, not both, not neither; a known corpus name."""
    if corpus is None and train is None:
        raise ValueError(
            "no data given: choose a corpus (data=tinyshakespeare or data=wikitext2) or "
            "a train file (data=text data.train=path/to/train.txt)"
        )
    if corpus is not None and (train, val, test) != (None, None, None):
        raise ValueError(
            f"corpus={corpus!r} comes with its own splits, so train/val/test files cannot "
            "be given too; use data=text for local files"
        )
    if corpus is not None and corpus not in CORPORA:
        raise ValueError(
            f"unknown corpus {corpus!r}; choose one of {sorted(CORPORA)} or use data=text "
            "with data.train=path/to/train.txt"
        )
