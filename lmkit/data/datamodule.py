"""TextDataModule: corpus files -> tokenizer -> cached token ids -> train/val/test batches.

Training batches are random windows drawn from a generator seeded by (seed, step, rank): the
batch of step ``s`` is a pure function of them, so a resumed run continues the same data order.
Evaluation covers a split in order, scoring every token after the first exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import tokenizers as hf_tokenizers
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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
from lmkit.data.tokenizers import Tokenizer, check_tokenizer_config, train_tokenizer
from lmkit.evaluation import count_words

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # targets of padding in the last evaluation window
_CACHE_VERSION = 1  # bump when the cache layout or the tokenization changes
_ENCODE_BATCH_LINES = 1000
UNBOUNDED_STEPS = 2**40  # the train loader's length when max_steps is not given


class StepIndexedTraining:
    """Resumable training order for data modules whose train batch ``s`` is a pure function of
    (seed, s, rank): the state is the number of train batches consumed, stored in checkpoints."""

    seed: int
    start_step: int = 0
    trainer: Any
    ngram_baseline = True  # the data is a token stream an n-gram model can be fit on

    def set_start_step(self, step: int) -> None:
        """Make the next train loader start at train batch ``step`` (0 = the beginning)."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0")
        self.start_step = int(step)

    def state_dict(self) -> dict[str, Any]:
        """The train batches consumed so far: Lightning stores this in every checkpoint."""
        return {"step": self._consumed_batches(), "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning(
                "resuming with seed=%s but the checkpoint used seed=%s: the data order changes",
                self.seed,
                state_dict["seed"],
            )
        self.set_start_step(int(state_dict["step"]))

    def _train_rank_and_length(self) -> tuple[int, int]:
        """This process's rank (part of the batch seed) and the train loader's length in
        batches: ``max_steps * accumulate_grad_batches``, unbounded without max_steps."""
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is not None and trainer.world_size > 1 and connector.use_distributed_sampler:
            raise ValueError(
                f"{type(self).__name__} gives each rank its own batches, and a distributed "
                "sampler would reorder its steps; set trainer.use_distributed_sampler=false"
            )
        rank = int(trainer.global_rank) if trainer is not None else 0
        accumulate = int(trainer.accumulate_grad_batches) if trainer is not None else 1
        max_steps = getattr(self, "max_steps", None)
        return rank, (max_steps * accumulate if max_steps else UNBOUNDED_STEPS)

    def _consumed_batches(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self.start_step
        # a checkpoint is taken at an optimizer step boundary
        return int(trainer.global_step) * int(trainer.accumulate_grad_batches)


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
            raise ValueError(
                f"num_workers={num_workers} must be >= 0 (0 loads in the main process)"
            )
        tokenizer = dict(tokenizer) if tokenizer is not None else {"kind": "char"}
        unknown = set(tokenizer) - {"kind", "vocab_size"}
        if unknown:
            raise ValueError(
                f"tokenizer options {sorted(unknown)} are unknown; use kind and vocab_size only"
            )
        self.tokenizer_kind = tokenizer.get("kind", "char")
        self.tokenizer_vocab_size = tokenizer.get("vocab_size")
        check_tokenizer_config(self.tokenizer_kind, self.tokenizer_vocab_size)
        if corpus is not None and corpus not in CORPORA:
            raise ValueError(
                f"unknown corpus {corpus!r}; choose one of {sorted(CORPORA)} or use data=text "
                "with data.train=path/to/train.txt"
            )

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
        fingerprint = _fingerprint(corpus, shas, tok)
        cache_dir = cache_root() / "tokens" / fingerprint
        meta = _read_meta(cache_dir, fingerprint)
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
        log.info("training a %s tokenizer on the train split of %s", tok["kind"], corpus.name)
        batches = splits["train"].iter(batch_size=_ENCODE_BATCH_LINES)
        lines = (line for batch in batches for line in batch["text"])
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
        for split, ds in splits.items():
            ids = _encode(ds, tokenizer, split, fingerprint).astype(dtype)
            _atomic_write(cache_dir / f"{split}.bin", ids.tobytes())
            meta["tokens"][split] = int(ids.size)
            meta["bytes"][split] = int(token_bytes[ids].sum())
            meta["scored_bytes"][split] = int(token_bytes[ids[1:]].sum())
        _atomic_write(cache_dir / "tokenizer.json", tokenizer.to_json().encode())
        # meta.json last: its presence marks a complete cache
        _atomic_write(cache_dir / "meta.json", json.dumps(meta, indent=2).encode())
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
        """The ordered, every-token-once loader of any split (for scripts and baselines)."""
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
        return self._loader(dataset, batch_size=self.eval_batch_size, shuffle=False)

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
            **kwargs,
        )


class TokenFile:
    """A lazily opened read-only memmap of a ``.bin`` token file; pickles as its path, so
    DataLoader workers open their own map instead of receiving a copy of the array."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.path, self.dtype = Path(path), dtype
        self._array: np.memmap | None = None

    @property
    def array(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "_array": None}


class TrainWindows(Dataset):
    """Map-style dataset indexed by train step; item ``s`` is the whole batch of step ``s``:
    ``batch_size`` windows at offsets drawn from a generator seeded by (seed, s, rank)."""

    def __init__(
        self, tokens: TokenFile, block_size: int, batch_size: int, seed: int, rank: int, length: int
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.length = seed, rank, length

    def __len__(self) -> int:
        return self.length

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, self.rank])
        # an offset o needs o + block_size + 1 <= n tokens
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokens.array
        T = self.block_size
        rows = np.stack([ids[o : o + T + 1] for o in self.offsets(step)]).astype(np.int64)
        rows = torch.from_numpy(rows)  # [B, T + 1]
        return rows[:, :-1], rows[:, 1:]  # x, y: [B, T], y is x shifted by one


class StepSampler(Sampler[int]):
    """Yields train steps ``start, start + 1, ... , length - 1``; ``start`` is read from the
    datamodule when iteration begins, so a restored ``start_step`` takes effect."""

    def __init__(self, datamodule: StepIndexedTraining, length: int) -> None:
        self.datamodule, self.length = datamodule, length

    def __len__(self) -> int:
        # the run's total; Lightning counts a resumed epoch from where the checkpoint left it
        return self.length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.datamodule.start_step, self.length))


class TrainLoader(DataLoader):
    """The train DataLoader, stateful for Lightning: its state (the datamodule's step) is saved
    with the loop state and restored before iteration, so Lightning knows that a checkpoint
    taken mid-epoch resumes exactly (the datamodule's own state_dict carries the same step)."""

    def state_dict(self) -> dict[str, Any]:
        datamodule = getattr(self.sampler, "datamodule", None)
        return datamodule.state_dict() if datamodule is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        datamodule = getattr(self.sampler, "datamodule", None)
        if datamodule is not None and state_dict:
            datamodule.load_state_dict(state_dict)


class EvalWindows(Dataset):
    """Non-overlapping windows over a split: window i has x = ids[iT : iT+T] and
    y = ids[iT+1 : iT+T+1]; the last one is padded with x = 0, y = IGNORE_INDEX, so every
    token after the first is a target exactly once."""

    def __init__(self, tokens: TokenFile, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return -(-(len(self.tokens) - 1) // self.block_size)  # ceil((n - 1) / T)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        chunk = np.asarray(self.tokens.array[i * T : i * T + T + 1], dtype=np.int64)
        x = torch.zeros(T, dtype=torch.long)
        y = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        x[: min(len(chunk), T)] = torch.from_numpy(chunk[:T])
        y[: len(chunk) - 1] = torch.from_numpy(chunk[1:])
        return x, y


def _fingerprint(corpus: Corpus, shas: dict[Path, str], tok: dict[str, Any]) -> str:
    key = {
        "version": _CACHE_VERSION,
        "tokenizers": hf_tokenizers.__version__,
        "splits": {
            split: [shas[src.path], src.start, src.stop]
            for split, src in sorted(corpus.splits.items())
        },
        "tokenizer": [tok["kind"], tok["vocab_size"]],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_meta(cache_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The cache's meta.json when the cache is complete and consistent, else None."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        if meta["fingerprint"] != fingerprint or not (cache_dir / "tokenizer.json").is_file():
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, n in meta["tokens"].items():
            if (cache_dir / f"{split}.bin").stat().st_size != n * itemsize:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return meta


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _encode(ds: Any, tokenizer: Tokenizer, split: str, fingerprint: str) -> np.ndarray:
    """Token ids of a split's lines, concatenated (equal to encoding the whole text)."""
    encoded = ds.map(
        lambda batch: {"ids": tokenizer.encode_batch(batch["text"])},
        batched=True,
        batch_size=_ENCODE_BATCH_LINES,
        remove_columns=["text"],
        keep_in_memory=True,
        new_fingerprint=f"lmkit-{fingerprint}-{split}",
        desc=f"tokenizing {split}",
    )
    chunks = [c.flatten().to_numpy() for c in encoded.data.column("ids").chunks]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
