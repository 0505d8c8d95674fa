"""Multi-query associative recall (MQAR), the recall probe of zoology (Arora et al., ICLR 2024).

An example of ``seq_len`` tokens starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``
(distinct keys from ``[1, V/2)``, distinct values from ``[V/2, V)``). In the query region that
follows, every key appears once more, at an even offset ``2g`` drawn from a power law
``p(g) ~ g^(a-1)`` (short gaps are likely); the target at that position is the key's value.
Every other target is IGNORE_INDEX, so the loss and the accuracy see the answers only. The
remaining positions hold random tokens (``random_non_queries``) or 0.

Examples are generated in memory. Training draws fresh examples for every step from a generator
seeded by (seed, step, rank), so a resumed run sees the same stream; val and test are fixed sets
drawn from seeds of their own.
"""

from __future__ import annotations

from typing import Any

import lightning
import numpy as np
import tokenizers
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lmkit.data.tokenizers import Tokenizer
from lmkit.data.windows import (
    RankShard,
    StepIndexedTraining,
    StepSampler,
    TrainLoader,
    private_generator,
)
from lmkit.evaluation import IGNORE_INDEX

_VAL_STREAM, _TEST_STREAM = 1, 2  # seed words of the fixed evaluation sets


def check_mqar_config(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    """Zoology's constraints, as one clear error each."""
    for name, value in (
        ("vocab_size", vocab_size),
        ("block_size", seq_len),
        ("num_kv_pairs", num_kv_pairs),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"data.{name}={value!r} must be a positive integer")
    if seq_len % 2:
        raise ValueError(f"data.block_size={seq_len} must be even (queries sit at even offsets)")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"data.num_kv_pairs={num_kv_pairs} needs block_size >= 4 * num_kv_pairs "
            f"= {4 * num_kv_pairs} (the pairs, then one query slot pair per key); "
            f"got block_size={seq_len}"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"data.vocab_size={vocab_size} leaves {vocab_size // 2 - 1} distinct keys for "
            f"num_kv_pairs={num_kv_pairs}; use vocab_size >= {2 * num_kv_pairs + 2}"
        )


def mqar_examples(
    rng: np.random.Generator,
    num_examples: int,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both int64 ``[num_examples, seq_len]``; targets are IGNORE_INDEX
    except at the query positions, where they hold the value paired with the queried key."""
    check_mqar_config(vocab_size, seq_len, num_kv_pairs)
    n, K, T = num_examples, num_kv_pairs, seq_len
    half = vocab_size // 2
    # distinct keys and values per example: the first K of a random permutation of each range
    keys = 1 + np.argsort(rng.random((n, half - 1)), axis=1)[:, :K]
    values = half + np.argsort(rng.random((n, vocab_size - half)), axis=1)[:, :K]
    context = 2 * K
    slots = (T - context) // 2  # query slots at even offsets of the query region
    # K distinct slots per example, drawn without replacement with p(g) ~ a g^(a-1) (g = 1..):
    # the K largest of log p + Gumbel noise is exactly sequential weighted sampling
    log_p = (power_a - 1) * np.log(np.arange(1, slots + 1))
    gumbel = -np.log(-np.log(rng.random((n, slots))))
    gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :K]

    inputs = np.zeros((n, T), dtype=np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    query_pos = context + 2 * gaps  # where each key is asked again
    rows = np.arange(n)[:, None]
    inputs[rows, query_pos] = keys
    targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
    targets[rows, query_pos] = values  # the next token after the query key: its value
    if random_non_queries:
        filler = np.ones((n, T), dtype=bool)
        filler[:, :context] = False
        filler[rows, query_pos] = False
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def integer_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer whose tokens are the ids written as numbers ("0" ... "V-1"), so
    MQAR checkpoints carry a tokenizer like every other lmkit checkpoint."""
    vocab = {str(i): i for i in range(vocab_size)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, "word")


class MQARBatches(Dataset):
    """Map-style dataset indexed by train step; item ``s`` is the whole batch of step ``s``."""

    def __init__(self, spec: dict[str, Any], batch_size: int, seed: int, rank: int, length: int):
        self.spec, self.batch_size = spec, batch_size
        self.seed, self.rank, self.length = seed, rank, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 0, step, self.rank])
        return mqar_examples(rng, self.batch_size, **self.spec)


class MQARDataModule(StepIndexedTraining, lightning.LightningDataModule):
    """MQAR batches for LanguageModelTask: the loss and ``val/acc`` count answer positions only.

    ``block_size`` is the sequence length T, ``vocab_size`` the V of the task (keys use the lower
    half, values the upper half). MQAR's tokens are its own integer ids: it takes no tokenizer.
    """

    ngram_baseline = False  # no text: the n-gram baseline does not apply

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        num_kv_pairs: int = 8,
        block_size: int = 64,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_val_examples: int = 1000,
        num_test_examples: int = 1000,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        seed: int = 1337,
        max_steps: int | None = None,
    ) -> None:
        super().__init__()
        check_mqar_config(vocab_size, block_size, num_kv_pairs)
        for name, value in (
            ("batch_size", batch_size),
            ("num_val_examples", num_val_examples),
            ("num_test_examples", num_test_examples),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be a positive integer")
        if not 0 < power_a <= 1:
            raise ValueError(f"data.power_a={power_a} must be in (0, 1] (zoology uses 0.01)")
        self.spec = {
            "vocab_size": vocab_size,
            "seq_len": block_size,
            "num_kv_pairs": num_kv_pairs,
            "power_a": power_a,
            "random_non_queries": random_non_queries,
        }
        self.block_size, self.batch_size = block_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_examples = {"val": num_val_examples, "test": num_test_examples}
        self.seed = seed
        self.max_steps = max_steps if max_steps is not None and max_steps > 0 else None
        self.start_step = 0
        self.tokenizer = integer_tokenizer(vocab_size)
        self.split_names = ["val", "test"]
        self._eval_sets: dict[str, TensorDataset] = {}

    @property
    def vocab_size(self) -> int:
        return self.spec["vocab_size"]

    def prepare(self) -> None:
        """Generate the fixed evaluation sets (the train stream is generated per step)."""
        for split, stream in (("val", _VAL_STREAM), ("test", _TEST_STREAM)):
            if split not in self._eval_sets:
                rng = np.random.default_rng([self.seed, stream])
                x, y = mqar_examples(rng, self.num_examples[split], **self.spec)
                self._eval_sets[split] = TensorDataset(x, y)

    def prepare_data(self) -> None:
        self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        rank, length = self._train_rank_and_length()
        dataset = MQARBatches(self.spec, self.batch_size, self.seed, rank, length)
        generator = private_generator(self.seed)
        return TrainLoader(
            dataset, batch_size=None, sampler=StepSampler(self, length), generator=generator
        )

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The train batch of ``step`` (rank 0), without a DataLoader."""
        return MQARBatches(self.spec, self.batch_size, self.seed, 0, step + 1)[step]

    def eval_dataloader(self, split: str) -> DataLoader:
        if split not in self.split_names:
            raise ValueError(f"split {split!r} is not in MQAR; its splits are {self.split_names}")
        self.prepare()
        shard = RankShard(len(self._eval_sets[split]), *self._rank_and_world())
        return DataLoader(
            self._eval_sets[split],
            batch_size=self.eval_batch_size,
            sampler=shard,
            generator=private_generator(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
