"""Token windows: the step-indexed, resumable training order and the evaluation windows.

Training batches are random windows drawn from a generator seeded by (seed, step, rank): the
batch of step ``s`` is a pure function of them, so a resumed run continues the same data order
and every DDP rank draws its own. Evaluation covers a split in order, scoring every token after
the first exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmkit.data.shards import ShardedTokens
from lmkit.evaluation import IGNORE_INDEX

log = logging.getLogger(__name__)

UNBOUNDED_STEPS = 2**40  # the train loader's length when max_steps is not given


def private_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator. Starting an iterator draws a base seed from the loader's
    generator, by default torch's global one, which dropout draws from: a resumed run (which
    starts a new train iterator) or a validation pass (a new val iterator) would shift every
    later dropout mask. With its own generator a loader leaves dropout's stream alone."""
    return torch.Generator().manual_seed(seed)


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

    def _rank_and_world(self) -> tuple[int, int]:
        """(rank, world size) of this process: each rank scores its own share of an evaluation
        split, so that every token is scored once in total (the sums are reduced across ranks)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _consumed_batches(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self.start_step
        # a checkpoint is taken at an optimizer step boundary
        return int(trainer.global_step) * int(trainer.accumulate_grad_batches)


def rank_part(num_tokens: int, rank: int, world: int) -> tuple[int, int]:
    """Tokens [start, stop) of the train stream that ``rank`` of ``world`` draws its windows
    from: contiguous, disjoint parts, so no two ranks (or nodes) ever read the same token."""
    return num_tokens * rank // world, num_tokens * (rank + 1) // world


class TrainWindows(Dataset):
    """Map-style dataset indexed by train step; item ``s`` is the whole batch of step ``s``:
    ``batch_size`` windows at offsets drawn from a generator seeded by (seed, s, rank), inside
    the rank's own part of the stream (:func:`rank_part`; the whole stream for one process)."""

    def __init__(
        self,
        tokens: ShardedTokens,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int,
        length: int,
        world: int = 1,
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.length = seed, rank, length
        self.start, self.stop = rank_part(len(tokens), rank, world)
        if self.stop - self.start <= block_size:
            raise ValueError(
                f"the train split's {len(tokens)} tokens give each of {world} ranks "
                f"{self.stop - self.start}, fewer than a window of block_size + 1 = "
                f"{block_size + 1}; use a smaller block_size or more train data"
            )

    def __len__(self) -> int:
        return self.length

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, self.rank])
        # an offset o needs o + block_size + 1 <= stop
        return self.start + rng.integers(
            0, self.stop - self.start - self.block_size, size=self.batch_size
        )

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        windows = [self.tokens.window(o, o + T + 1) for o in self.offsets(step)]
        rows = np.stack(windows).astype(np.int64)
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

    def __init__(self, tokens: ShardedTokens, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return -(-(len(self.tokens) - 1) // self.block_size)  # ceil((n - 1) / T)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        chunk = self.tokens.window(i * T, i * T + T + 1).astype(np.int64)
        x = torch.zeros(T, dtype=torch.long)
        y = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        x[: min(len(chunk), T)] = torch.from_numpy(chunk[:T])
        y[: len(chunk) - 1] = torch.from_numpy(chunk[1:])
        return x, y


class RankShard(Sampler[int]):
    """A contiguous block of the indices of a dataset of `length` items per rank: the ranks'
    blocks are disjoint and cover it once (no padding, unlike DistributedSampler), and each
    rank reads its own stretch of the split's shards."""

    def __init__(self, length: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.length, self.rank, self.world = length, rank, world
        self.indices = range(*rank_part(length, rank, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
