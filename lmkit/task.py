"""LanguageModelTask: the LightningModule that trains and evaluates a DecoderLM."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from lmkit.errors import DivergenceError, divergence_message
from lmkit.evaluation import (
    IGNORE_INDEX,
    correct_count,
    nll_sums,
    summarize,
    token_nll,
    word_perplexity,
)


def masked_mean_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean NLL over the scored targets (all of them for text; the answers only for MQAR)."""
    return token_nll(logits, targets).sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; biases, norm gains, embeddings and tensors marked
    `_no_weight_decay` do not. Tied parameters are listed once."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if p.dim() < 2 or id(p) in embedding_params or getattr(p, "_no_weight_decay", False):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    min_ratio: float,
    time_fraction: Callable[[], float] | None = None,
) -> float:
    """LR multiplier: linear warmup to 1 over warmup_steps, then cosine decay to min_ratio.

    The decay follows whichever budget binds: steps (progress through max_steps; none when
    max_steps is -1) or time (`time_fraction()`, the share of the time between the end of
    warmup and trainer.max_time spent), so a run stopped by its time budget ends at the floor
    instead of being cut off mid-schedule.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = 0.0
    if max_steps > 0:
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if time_fraction is not None:
        progress = max(progress, time_fraction())
    progress = min(1.0, progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LanguageModelTask(L.LightningModule):
    """Next-token cross-entropy, AdamW on matrices only, warmup + cosine, ppl and bits per byte.

    `optimizer` is a partial of a torch optimizer (Hydra `_partial_: true`), completed with the
    parameter groups. `token_bytes` ([V], UTF-8 bytes of each token) turns NLL into bits per byte.
    `checkpoint_extras` (resolved config, tokenizer) is stored in every checkpoint under "lmkit".
    `word_counts` ({split: {"words", "scored_tokens"}}) adds `word_ppl`, the total NLL per word,
    to evaluations that score a whole split.

    Subclasses change what is trained and measured through four hooks: `training_loss`,
    `parameter_groups`, `eval_counts` (extra sums per evaluation batch) and `eval_metrics`
    (those sums over the split -> metrics).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: Callable[..., torch.optim.Optimizer],
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int = 1000,
        min_lr: float = 0.0,
        token_bytes: Tensor | None = None,
        checkpoint_extras: dict | None = None,
        word_counts: dict[str, dict[str, int]] | None = None,
    ) -> None:
        super().__init__()
        lr = getattr(optimizer, "keywords", {}).get("lr")
        if lr is not None and lr <= 0:
            raise ValueError(f"optim.optimizer.lr={lr} must be positive")
        if max_steps < 1 and max_steps != -1:
            raise ValueError(f"trainer.max_steps={max_steps} must be >= 1 (or -1 with max_time)")
        if warmup_steps < 0 or min_lr < 0 or weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.min_lr and optim.weight_decay must be >= 0")
        self.model, self.optimizer_factory = model, optimizer
        self.weight_decay, self.warmup_steps = weight_decay, warmup_steps
        self.max_steps, self.min_lr, self.lr = max_steps, min_lr, lr
        vocab = getattr(model, "vocab_size", None)
        if token_bytes is None:
            token_bytes = torch.ones(vocab or 1, dtype=torch.long)
        self.register_buffer(
            "token_bytes", torch.as_tensor(token_bytes, dtype=torch.long), persistent=False
        )
        self.checkpoint_extras = checkpoint_extras or {}
        # per split: words and the tokens a whole-split evaluation scores (word-normalized ppl)
        self.word_counts = word_counts or {}
        self._eval_sums: Tensor | None = None
        self._step_start = 0.0
        self._fit_start: float | None = None
        self._val_start = 0.0
        self.fit_val_seconds = 0.0  # spent validating during fit
        self.last_val: dict | None = None  # the metrics (and step) of the last validation in fit
        self._timer: Timer | None = None  # trainer.max_time's clock (found on first use)
        self._warmup_end_s: float | None = None  # its reading when warmup ended
        self.step_times: list[float] = []
        self._extra_sums: Tensor | None = None

    def forward(self, idx: Tensor) -> Tensor:
        return self.model(idx)

    # ---- hooks for subclasses -------------------------------------------------------------
    def training_loss(self, x: Tensor, y: Tensor, logging: bool) -> Tensor:
        """The loss to minimise on one batch; `logging` says whether this step's metrics reach
        the loggers."""
        loss = masked_mean_nll(self.model(x), y)
        if logging:
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def parameter_groups(self) -> list[dict]:
        """The optimizer's parameter groups (AdamW: decay on matrices only)."""
        return param_groups(self.model, self.weight_decay)

    def eval_counts(self, h: Tensor, y: Tensor) -> Tensor | None:
        """Extra float64 sums of one evaluation batch from the final hidden states h [B, T, D]
        and targets y (summed over the split and across ranks); None: none."""
        return None

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        """Metrics from the split's `eval_counts` sums."""
        return {}

    # ---- training -------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.training_loss(x, y, self._logging_step())

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        self.step_times.append(elapsed)
        if self._logging_step():
            tokens = batch[0].numel() * self.trainer.world_size
            self.log("tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True)
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def _logging_step(self) -> bool:
        """Whether this step's metrics reach the loggers (every trainer.log_every_n_steps).
        A self.log call is costly Python next to a small CPU step, so the other steps skip it."""
        connector = getattr(self._trainer, "_logger_connector", None)  # Lightning's own test
        return bool(getattr(connector, "should_update_logs", True))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """One pass over the gradients per step: their total norm (a foreach kernel) is checked
        for divergence before the update, logged, and reused to clip (Lightning's own clipping
        would compute it again). Only where every rank holds whole gradients (one device, DDP
        after its all-reduce, so all ranks decide alike); sharded strategies (FSDP) keep
        Lightning's own strategy-aware clipping."""
        if not isinstance(self.trainer.strategy, SingleDeviceStrategy | DDPStrategy):
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                f"trainer.gradient_clip_algorithm={gradient_clip_algorithm!r}; lmkit clips by norm"
            )
        # the optimizer's own list: no walk over the module tree every step
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not params:
            return
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # the raw gradient's size
        # 16-mixed: the grad scaler skips overflowing steps itself (DivergenceGuard watches the
        # loss there). Elsewhere a non-finite norm must stop the run before the update.
        if self.trainer.precision != "16-mixed" and not torch.isfinite(norm):
            raise DivergenceError(
                divergence_message(self.trainer.global_step, "a gradient is not finite")
            )
        if self._logging_step():
            self.log("grad_norm", norm)
        if gradient_clip_val:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def configure_optimizers(self):
        groups = self.parameter_groups()
        options = {}
        keywords = getattr(self.optimizer_factory, "keywords", {})
        adam = getattr(self.optimizer_factory, "func", None) in (
            torch.optim.AdamW,
            torch.optim.Adam,
        )
        fusable = self.device.type in ("cuda", "cpu")
        if adam and fusable and not {"fused", "foreach"} & keywords.keys():
            # One kernel for every parameter, on CPU too (docs/throughput.md has the figures).
            options["fused"] = True
        optimizer = self.optimizer_factory(groups, **options)
        min_ratio = self.min_lr / self.lr if self.lr else 0.0
        schedule = partial(
            warmup_cosine,
            warmup_steps=self.warmup_steps,
            max_steps=self.max_steps,
            min_ratio=min_ratio,
            time_fraction=self._time_fraction if self._time_budget() else None,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _time_budget(self) -> Timer | None:
        """Lightning's Timer of trainer.max_time (the clock that stops the run), if any."""
        trainer = self._trainer
        callbacks = trainer.callbacks if trainer is not None else []
        timer = next((c for c in callbacks if isinstance(c, Timer)), None)
        return timer if timer is not None and timer.time_remaining() is not None else None

    def _time_fraction(self) -> float:
        """Share of the decay's time spent: from the end of warmup to trainer.max_time (so the
        peak learning rate is where warmup left it). warmup_cosine calls this only after
        warmup; the first call marks its end. The Timer's clock counts validation and is
        restored on resume (the warmup mark travels in the checkpoint); under DDP rank 0's
        fraction is used by all, so every rank steps with the same learning rate."""
        if self._timer is None:
            self._timer = self._time_budget()
        if self._timer is None:
            return 0.0
        elapsed = self._timer.time_elapsed()
        budget = elapsed + self._timer.time_remaining()
        if self._warmup_end_s is None:
            self._warmup_end_s = elapsed
        fraction = (elapsed - self._warmup_end_s) / max(budget - self._warmup_end_s, 1e-9)
        return float(self.trainer.strategy.broadcast(fraction))

    # ---- evaluation: sums over the whole split, reduced across ranks -------------------
    def _eval_step(self, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        h = self.model.hidden_states(x)
        logits = self.model.head(h)
        sums = torch.stack([*nll_sums(logits, y, self.token_bytes), correct_count(logits, y)])
        self._eval_sums = sums if self._eval_sums is None else self._eval_sums + sums
        extra = self.eval_counts(h, y)
        if extra is not None:
            self._extra_sums = extra if self._extra_sums is None else self._extra_sums + extra

    def _eval_end(self, prefix: str) -> None:
        sums = (
            self._eval_sums if self._eval_sums is not None else torch.zeros(4, dtype=torch.float64)
        )
        sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum")
        self._eval_sums = None
        metrics = summarize(*sums.tolist())
        counts = self.word_counts.get(prefix)
        if counts and int(sums[1]) == counts["scored_tokens"]:  # only over the whole split
            metrics["word_ppl"] = word_perplexity(float(sums[0]), counts["words"])
        if self._extra_sums is not None:
            extra = self.trainer.strategy.reduce(self._extra_sums.to(self.device), reduce_op="sum")
            self._extra_sums = None
            metrics.update(self.eval_metrics(extra))
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "loss", rank_zero_only=False)
        in_fit = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if prefix == "val" and self._fit_start is not None and in_fit:
            # wall time since fit started (this attempt), for loss-against-time curves
            self.log("val/elapsed_s", time.perf_counter() - self._fit_start, rank_zero_only=False)
            self.last_val = {"step": self.trainer.global_step, **metrics}

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_start(self) -> None:
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # the time validation took out of the training run
            self.fit_val_seconds += time.perf_counter() - self._val_start

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ---- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lmkit"] = self.checkpoint_extras
        checkpoint["lmkit_schedule"] = {"warmup_end_s": self._warmup_end_s}
        # Dropout draws from torch's global generator: restore it for an exact resume.
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._warmup_end_s = checkpoint.get("lmkit_schedule", {}).get("warmup_end_s")
        rng = checkpoint.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
