"""HFDataModule (``data=hf``): any ``datasets`` source -> a tokenizer with an end-of-text token
-> token shards, prepared once -> the same train/val/test batches as TextDataModule.

The shards of a split are read as one stream (:class:`~lmkit.data.shards.ShardedTokens`), so the
guarantees are TextDataModule's: train batch ``s`` is a pure function of (seed, s, rank), every
rank draws from its own part of the train tokens, and evaluation scores every token once, each
rank its own contiguous stretch of the split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers as hf_tokenizers
from filelock import FileLock

from lmkit.data.corpora import cache_root
from lmkit.data.hf_source import HFSource, Holdout, fingerprint
from lmkit.data.shard_writer import PrepareOptions, ShardPreparation, read_manifest
from lmkit.data.shards import ShardedTokens
from lmkit.data.token_datamodule import TokenDataModule
from lmkit.data.tokenizers import Tokenizer, check_tokenizer_config

log = logging.getLogger(__name__)

SHARD_CACHE_VERSION = 1  # bump when the shard layout or the tokenization changes


class HFDataModule(TokenDataModule):
    """Language-modelling data from a ``datasets`` source, prepared into token shards.

    ``path`` is what ``datasets.load_dataset`` takes first: a hub dataset (with ``name``, the
    config, and ``revision``) or a file format (``parquet``, ``json``/``jsonl``, ``csv``,
    ``text``) with ``data_files`` (a glob, a list, or ``{split: glob}``). ``text_column`` holds
    the documents. ``val_split`` / ``test_split`` name splits of the source; without them val
    (and test, when ``holdout.test`` > 0) are documents held out of ``train_split``: a fraction
    or a count, seeded by ``holdout.seed`` (not the training seed, so runs that vary the seed
    share one preparation). ``prepare`` options: ``shard_tokens``, ``batch_documents``,
    ``workers`` (None: one per core), ``tokenizer_sample_bytes``.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        name: str | None = None,
        data_files: Any = None,
        revision: str | None = None,
        text_column: str = "text",
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        holdout: Mapping[str, Any] | None = None,
        streaming: bool = False,
        prepare: Mapping[str, Any] | None = None,
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
        self.source = HFSource(
            path=path or "",
            name=name,
            data_files=plain_data_files(data_files),
            revision=revision,
            text_column=text_column,
            train_split=train_split,
            val_split=val_split,
            test_split=test_split,
            holdout=holdout_of(holdout),
            streaming=bool(streaming),
        )
        self.source.check_options()
        self.options = PrepareOptions(**dict(prepare or {}))
        tokenizer = (
            dict(tokenizer) if tokenizer is not None else {"kind": "bpe", "vocab_size": 4096}
        )
        check_tokenizer_config(tokenizer.get("kind", "char"), tokenizer.get("vocab_size"))
        self.tokenizer_config = {
            "kind": tokenizer.get("kind", "char"),
            "vocab_size": tokenizer.get("vocab_size"),
        }
        self.cache_dir: Path | None = None

    def fingerprint(self) -> str:
        """What the shards depend on: the source (local files by size and mtime), the
        tokenizer and its sample, the shard size and the libraries' versions."""
        return fingerprint(
            {
                "version": SHARD_CACHE_VERSION,
                "tokenizers": hf_tokenizers.__version__,
                "source": self.source.fingerprint_key(),
                "streaming": self.source.streaming,
                "tokenizer": self.tokenizer_config,
                "sample_bytes": self.options.tokenizer_sample_bytes,
                "shard_tokens": self.options.shard_tokens,
            }
        )

    def prepare(self) -> None:
        """Check the source, then prepare the shards (resuming a killed preparation) or load
        them from the cache. Idempotent; cheap when cached; needs no Trainer."""
        if self.tokenizer is not None:
            return
        # the options and globs; the files' encodings are read only when preparing (open())
        self.source.check_files(encodings=False)
        key = self.fingerprint()
        cache_dir = cache_root() / "shards" / key
        manifest = read_manifest(cache_dir, key)
        self.cache_hit = manifest is not None
        if manifest is None:
            manifest = self._prepare_locked(cache_dir, key)
        self._check_block_size(manifest["tokens"])
        self.meta, self.cache_dir = manifest, cache_dir
        self.split_names = list(manifest["splits"])
        self.split_words = {s: v["words"] for s, v in manifest["splits"].items()}
        self.ids = {
            split: ShardedTokens([cache_dir / r["file"] for r in info["shards"]], manifest["dtype"])
            for split, info in manifest["splits"].items()
        }
        self.tokenizer = Tokenizer.load(cache_dir / "tokenizer.json")
        log.info(
            "data: %s in %s (%s)",
            ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in manifest["splits"].items()),
            cache_dir,
            "cached" if self.cache_hit else "prepared",
        )

    def _prepare_locked(self, cache_dir: Path, key: str) -> dict[str, Any]:
        """Prepare under a file lock: DDP ranks and nodes sharing the cache start together, one
        prepares and the others wait and then read its manifest."""
        self.source.open()  # the source's own checks (splits, column) before anything is written
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_dir) + ".lock"):
            manifest = read_manifest(cache_dir, key)  # another process may have finished it
            if manifest is not None:
                return manifest
            preparation = ShardPreparation(
                self.source, cache_dir, self.tokenizer_config, self.options, key
            )
            return preparation.run()

    def tokens(self, split: str) -> ShardedTokens:
        return self._prepared().ids[split]

    def _longer_split_fix(self, split: str) -> str:
        held = self.source.held_out().get(split)
        return f"hold out more documents (data.holdout.{split}, now {held}) or " if held else ""


def holdout_of(options: Mapping[str, Any] | None) -> Holdout:
    options = dict(options or {"val": 0.005})
    unknown = set(options) - {"val", "test", "seed"}
    if unknown:
        raise ValueError(f"holdout options {sorted(unknown)} are unknown; use val, test, seed")
    return Holdout(**options)


def plain_data_files(value: Any) -> Any:
    """OmegaConf lists and dicts -> Python ones (datasets checks for str, list or dict)."""
    if isinstance(value, Mapping):
        return {str(k): plain_data_files(v) for k, v in value.items()}
    if value is None or isinstance(value, str):
        return value
    return [str(v) for v in value]
