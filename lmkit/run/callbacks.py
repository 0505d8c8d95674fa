"""Training callbacks: stop cleanly on SIGTERM/SIGINT, refuse to train on a diverged loss, show
progress, and time one mixer layer after training (the sweep report's throughput plot)."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch import nn

from lmkit.data.windows import UNBOUNDED_STEPS
from lmkit.errors import DivergenceError, divergence_message
from lmkit.run.timing import layer_costs

log = logging.getLogger(__name__)


class GracefulStop(L.Callback):
    """On SIGTERM (cluster preemption) or SIGINT (Ctrl+C), finish the current step, write
    `last.ckpt` and stop, so that `resume=true` continues the exact run.

    The signal only sets a flag: the checkpoint is taken at a step boundary, where optimizer,
    scheduler, data order and step counter are consistent. Under DDP the ranks agree on stopping.
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.requested: int | None = None  # the signal received, if any
        self.stopped_at: int | None = None  # the global step of the checkpoint written
        self._previous: dict[int, object] = {}

    def _request(self, signum: int, frame) -> None:
        self.requested = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own handlers (registered when fit starts), so ours take the signals.
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._request)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
        if stop and self.stopped_at is None:
            trainer.save_checkpoint(self.checkpoint_path, weights_only=False)
            self.stopped_at = trainer.global_step
            trainer.should_stop = True
            log.warning(
                "received %s: saved %s at step %d and stopped",
                signal.Signals(self.requested or signal.SIGTERM).name,
                self.checkpoint_path,
                trainer.global_step,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class DivergenceGuard(L.Callback):
    """Stop with a clear message when the training loss is non-finite under 16-mixed, where the
    grad scaler skips steps with overflowing gradients on its own and the loss is the signal.
    In every other precision LanguageModelTask checks the gradient norm before each update
    (a non-finite loss makes it non-finite too), so this guard adds no per-step host sync."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.precision != "16-mixed":
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            raise DivergenceError(
                divergence_message(trainer.global_step, f"the training loss is {float(loss)}")
            )


class TrainingProgressBar(RichProgressBar):
    """Lightning's rich bar, redrawn `refresh_rate` times a second, without a fake end for a
    time-bounded run: with no step limit (``max_steps=-1``, ``max_time`` set) the train loader
    is unbounded, so the bar counts steps without a total or time left, and the epoch shows no
    ``/-2`` of its unset maximum.

    4 redraws a second, not Lightning's 100: its refresh thread renders in Python, taking the GIL
    and a core from the math threads (docs/throughput.md measures the cost per CPU step); logged
    metrics are re-read only when a redraw shows them. In a notebook Lightning redraws at every
    step whatever the rate.
    """

    def __init__(self, refresh_rate: int = 4, **kwargs) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._metrics_read_at = -math.inf

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled:
            now = time.monotonic()
            if now - self._metrics_read_at < 1 / self.refresh_rate:
                return
            self._metrics_read_at = now
        super()._update_metrics(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics_read_at = -math.inf  # an epoch's last figures are always shown
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics_read_at = -math.inf  # and so is a new validation loss
        super().on_validation_end(trainer, pl_module)

    @property
    def total_train_batches(self) -> int | float:
        if self.trainer.max_steps == -1 and self.trainer.num_training_batches >= UNBOUNDED_STEPS:
            return float("inf")
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs != -1:
            return super()._get_train_description(current_epoch)
        # padded like Lightning's own, so the bar does not shift when validation's starts
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class MeasurementCallback(L.Callback):
    """A callback that measures something after training; its `seconds` are not the run's
    (train() leaves them out of wall_s)."""

    seconds: float = 0.0


class LayerBench(MeasurementCallback):
    """After fit, time one mixer layer (forward + backward) at each of `seq_lens` and write the
    rows to `path` (default run_dir/bench.json) as {"layer": [...]}: the sweep report's layer
    throughput plot. `mixer` is the model's mixer partial (the config's ``${model.mixer}``)."""

    def __init__(
        self,
        mixer: Callable[..., nn.Module],
        d_model: int,
        seq_lens: list[int],
        *,
        batch_size: int = 1,
        repeats: int = 3,
        path: str | Path | None = None,
    ) -> None:
        if not seq_lens or min(seq_lens) < 1:
            raise ValueError(f"callbacks.layer_bench.seq_lens={seq_lens} must be lengths >= 1")
        self.make_layer = partial(mixer, d_model)
        self.d_model, self.seq_lens = d_model, list(seq_lens)
        self.batch_size, self.repeats = batch_size, repeats
        self.path = Path(path) if path is not None else None
        self.rows: list[dict] = []

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        started = time.perf_counter()
        precision = str(trainer.precision)
        rows = layer_costs(
            self.make_layer,
            self.seq_lens,
            d_model=self.d_model,
            batch_size=self.batch_size,
            repeats=self.repeats,
            precision=precision if precision in ("32-true", "bf16-mixed") else "32-true",
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        self.rows = [{**row, "batch_size": self.batch_size} for row in rows]
        path = self.path or Path(trainer.default_root_dir) / "bench.json"
        path.write_text(json.dumps({"layer": self.rows}, indent=2))
        self.seconds += time.perf_counter() - started
