"""Perplexity, bits per byte and accuracy of a trained checkpoint on a split of its own data."""

from __future__ import annotations

import lightning as L

from lmkit.run.build import build_datamodule, build_model, build_task
from lmkit.run.checkpoint import restore
from lmkit.run.runtime import apply_runtime_settings


def evaluate_checkpoint(
    path: str,
    split: str = "val",
    *,
    limit_batches: int | float | None = None,
    precision: str | None = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a checkpoint on a split of the data it was trained on.

    Runs under the precision the model was trained with unless `precision` says otherwise, so the
    numbers reproduce those logged during training.
    """
    restored = restore(path)
    cfg = restored.config
    apply_runtime_settings(cfg)  # the matmul precision and threads training ran with
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    if datamodule.tokenizer.to_json() != restored.tokenizer.to_json():
        raise ValueError(
            f"the tokenizer built from the data now differs from the one in {path}; "
            f"the corpus files changed since training"
        )
    if split not in datamodule.split_names:
        raise ValueError(
            f"split={split!r} is not in this corpus; choose one of {list(datamodule.split_names)}"
        )
    # a fresh task around a fresh model: the task may wrap the model in modules of its own
    task = build_task(cfg, build_model(cfg, datamodule.vocab_size), datamodule)
    task.model.load_state_dict(restored.model.state_dict())
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        precision=precision or cfg.trainer.precision,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        limit_val_batches=limit_batches,
        limit_test_batches=limit_batches,
    )
    # validate for val, test for test: the metrics (per-word perplexity among them) are the
    # split's own, as during training
    run = trainer.validate if split == "val" else trainer.test
    metrics = run(task, datamodule=datamodule, verbose=False)[0]
    return {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{split}/")}
