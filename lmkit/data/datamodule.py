"""TextDataModule: corpus files -> tokenizer -> cached token ids -> train/val/test batches.

Training batches are random windows drawn from a generator seeded by (seed, step, rank): the
batch of step ``s`` is a pure function of them, so a resumed run continues the same data order.
Evaluation covers a split in order, scoring every token after the first exactly once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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
from lmkit.data.token_cache import (
    ENCODE_BATCH_LINES,
    cache_fingerprint,
    encode,
    log_unseen_chars,
    read_meta,
    unseen_chars,
)
from lmkit.data.tokenizers import Tokenizer, check_tokenizer_config, train_tokenizer
from lmkit.data.windows import (
    EvalWindows,
    RankShard,
    StepIndexedTraining,
    StepSampler,
    TokenFile,
    TrainLoader,
    TrainWindows,
    private_generator,
)
from lmkit.evaluation import count_words
from lmkit.files import atomic_write

log = logging.getLogger(__name__)



class TextDataModule(StepIndexedTraining, lightning.LightningDataModule):
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
        super().__init__()
        check_sources(corpus, train, val, test)
        check_loader_options(block_size, batch_size, eval_batch_size, num_workers)
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
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_steps = max_steps if max_steps is not None and max_steps > 0 else None
        self.start_step = 0  # the first train batch the next train_dataloader() yields

        self.tokenizer: Tokenizer | None = None
        self.ids: dict[str, np.memmap] = {}
        self.split_names: list[str] = []
        self.cache_dir: Path | None = None
        self.cache_hit: bool | None = None  # whether prepare() found everything cached
        self.meta: dict[str, Any] = {}

    # ---- preparation -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._prepared().tokenizer.vocab_size

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

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

    def _corpus(self) -> Corpus:
        if self.corpus_name is not None:
            return resolve_corpus(self.corpus_name)
        return local_corpus(self.train_file, self.val_file, self.test_file)

    def _check_block_size(self, tokens: Mapping[str, int]) -> None:
        for split, n in tokens.items():
            if self.block_size >= n:
                raise ValueError(
                    f"block_size={self.block_size} exceeds the {n} tokens of split '{split}' "
                    f"(a window needs block_size + 1 tokens); use block_size <= {n - 1}"
                )

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

    def _prepared(self) -> TextDataModule:
        if self.tokenizer is None:
            raise RuntimeError("the data is not prepared yet; call datamodule.prepare() first")
        return self

    # ---- bits per byte, words ------------------------------------------------------------

    def word_counts(self) -> dict[str, dict[str, int]]:
        """Per split: its words (``count_words`` of its text) and the tokens an evaluation of
        the whole split scores (all but the first), for word-normalized perplexity."""
        self._prepared()
        return {
            split: {
                "words": self.split_words[split],
                "scored_tokens": self.meta["tokens"][split] - 1,
            }
            for split in self.split_names
        }

    def scored_bytes(self, split: str) -> int:
        """UTF-8 bytes of the tokens scored in ``split`` (all but the first): the denominator
        of bits per byte, ``sum(nll) / (ln 2 * scored_bytes)``."""
        self._check_split(split)
        return int(self.meta["scored_bytes"][split])

    def _check_split(self, split: str) -> None:
        if split not in self._prepared().ids:
            raise ValueError(
                f"split {split!r} is not in this corpus; its splits are {self.split_names}"
                + (" (give data.test=path/to/test.txt for a test split)" if split == "test" else "")
            )

    # ---- loaders -----------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        """Batches ``(x, y)`` of int64 ``[batch_size, block_size]``; batch i of a run is
        ``batch_at(i)``, starting at ``start_step``. Under DDP each rank draws its own windows
        (the rank is part of the seed), so Lightning must not add a distributed sampler."""
        self._prepared()
        rank, length = self._train_rank_and_length()
        dataset = TrainWindows(
            self._token_file("train"), self.block_size, self.batch_size, self.seed, rank, length
        )
        return self._loader(
            dataset, loader_class=TrainLoader, batch_size=None, sampler=StepSampler(self, length)
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def eval_dataloader(self, split: str) -> DataLoader:
        """The ordered, every-token-once loader of any split (for scripts and baselines); under
        DDP each rank gets its own shard of the windows."""
        return self._eval_loader(split)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The train batch of ``step`` (rank 0), without a DataLoader."""
        self._prepared()
        windows = TrainWindows(
            self._token_file("train"), self.block_size, self.batch_size, self.seed, 0, step + 1
        )
        return windows[step]

    def _eval_loader(self, split: str) -> DataLoader:
        self._check_split(split)
        dataset = EvalWindows(self._token_file(split), self.block_size)
        shard = RankShard(len(dataset), *self._eval_shard())
        return self._loader(dataset, batch_size=self.eval_batch_size, sampler=shard)

    def _token_file(self, split: str) -> TokenFile:
        return TokenFile(self.cache_dir / f"{split}.bin", self.meta["dtype"])

    def _loader(
        self, dataset: Dataset, loader_class: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        if self.num_workers > 0:
            # the tokenizers are done; silence their warning about forking after parallel use
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return loader_class(
            dataset,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # page-locked batches copy to a GPU async
            generator=private_generator(self.seed),
            **kwargs,
        )



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


def check_loader_options(block_size, batch_size, eval_batch_size, num_workers) -> None:
    for name, value in (("block_size", block_size), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer, e.g. {name}=64")
    if eval_batch_size is not None and (
        not isinstance(eval_batch_size, int) or eval_batch_size < 1
    ):
        raise ValueError(
            f"eval_batch_size={eval_batch_size!r} must be a positive integer or null "
            "(null uses batch_size)"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 loads in the main process)")
