"""The part every token-stream data module shares: prepared splits of token ids -> the
step-indexed train loader, the every-token-once evaluation loaders, bits per byte and words.

A subclass's ``prepare()`` sets ``tokenizer``, ``meta`` (``tokens`` and ``scored_bytes`` per
split), ``split_names``, ``split_words`` and ``ids``, and its ``tokens(split)`` gives the
split's shard files as one :class:`~lmkit.data.shards.ShardedTokens` stream.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from lmkit.data.shards import ShardedTokens
from lmkit.data.tokenizers import Tokenizer
from lmkit.data.windows import (
    EvalWindows,
    RankShard,
    StepIndexedTraining,
    StepSampler,
    TrainLoader,
    TrainWindows,
    private_generator,
)

log = logging.getLogger(__name__)


class TokenDataModule(StepIndexedTraining, lightning.LightningDataModule, ABC):
    """Loaders over prepared token splits. ``max_steps`` (optimizer steps) sizes the train
    loader: ``max_steps * accumulate_grad_batches`` batches, unbounded when None or -1."""

    def __init__(
        self,
        *,
        block_size: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        max_steps: int | None,
    ) -> None:
        super().__init__()
        check_loader_options(block_size, batch_size, eval_batch_size, num_workers)
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.max_steps = max_steps if max_steps is not None and max_steps > 0 else None
        self.start_step = 0  # the first train batch the next train_dataloader() yields

        self.tokenizer: Tokenizer | None = None
        self.ids: dict[str, Any] = {}
        self.split_names: list[str] = []
        self.split_words: dict[str, int] = {}
        self.cache_hit: bool | None = None  # whether prepare() found everything cached
        self.meta: dict[str, Any] = {}

    @property
    def vocab_size(self) -> int:
        return self._prepared().tokenizer.vocab_size

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @abstractmethod
    def prepare(self) -> None:
        """Set tokenizer, meta, split_names, split_words and ids (cached after the first call)."""

    def _check_block_size(self, tokens: Mapping[str, int]) -> None:
        for split, n in tokens.items():
            if self.block_size >= n:
                raise ValueError(
                    f"block_size={self.block_size} exceeds the {n} tokens of split '{split}' "
                    f"(a window needs block_size + 1 tokens); {self._longer_split_fix(split)}"
                    f"use block_size <= {n - 1}"
                )

    def _longer_split_fix(self, split: str) -> str:
        """What else makes ``split`` long enough, ending in ' or ' (none by default)."""
        return ""

    def _prepared(self) -> TokenDataModule:
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
        world = self._rank_and_world()[1]
        tokens = self.tokens("train")
        dataset = TrainWindows(
            tokens, self.block_size, self.batch_size, self.seed, rank, length, world
        )
        if world > 1:
            files = tokens.files_in(dataset.start, dataset.stop)
            log.info(
                "rank %d of %d draws its train windows from tokens [%d, %d) of %d (%s)",
                rank,
                world,
                dataset.start,
                dataset.stop,
                len(tokens),
                f"{files[0]} to {files[-1]}" if len(files) > 1 else files[0],
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
            self.tokens("train"), self.block_size, self.batch_size, self.seed, 0, step + 1
        )
        return windows[step]

    def _eval_loader(self, split: str) -> DataLoader:
        self._check_split(split)
        dataset = EvalWindows(self.tokens(split), self.block_size)
        shard = RankShard(len(dataset), *self._rank_and_world())
        return self._loader(dataset, batch_size=self.eval_batch_size, sampler=shard)

    @abstractmethod
    def tokens(self, split: str) -> ShardedTokens:
        """The token ids of ``split`` as one stream over its shard files."""

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
