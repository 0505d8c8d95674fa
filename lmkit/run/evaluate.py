"""Perplexity, bits per byte and accuracy of a trained model on a split of its own data: in
training's non-overlapping windows, in rolling windows (eval.stride), and WikiText-2 article by
article as lm-evaluation-harness scores it (eval.documents)."""

from __future__ import annotations

import time

import lightning as L

from lmkit.data.corpora import data_root
from lmkit.data.wikitext import wikitext_split_file
from lmkit.rolling import check_rolling
from lmkit.run.build import build_datamodule, build_model, build_task
from lmkit.run.checkpoint import Restored, restore
from lmkit.run.rolling_eval import (
    check_precision_name,
    document_evaluation,
    evaluation_device,
    model_context,
    stride_evaluation,
)
from lmkit.run.runtime import apply_runtime_settings, resolve_precision


def evaluate_checkpoint(
    path: str,
    split: str = "val",
    *,
    limit_batches: int | float | None = None,
    precision: str | None = None,
    stride: int | None = None,
    documents: bool = False,
    detokenize: bool = True,
    batch_size: int = 8,
) -> dict:
    """Loss, perplexity and bits per byte of a checkpoint (or exported folder) on a split of the
    data it was trained on, in non-overlapping windows of block_size as training validates; with
    `stride`, also in rolling windows (under "stride"); with `documents`, also WikiText-2's
    articles as the harness scores them (under "documents"; detokenize=False scores them as
    stored).

    Runs under the precision the model was trained with unless `precision` says otherwise, so the
    numbers reproduce those logged during training.
    """
    check_protocol_options(stride, documents, limit_batches, batch_size)
    restored = restore(path)
    cfg = restored.config
    apply_runtime_settings(cfg)  # the matmul precision and threads training ran with
    precision = resolve_precision(precision or cfg.trainer.precision, cfg)
    if stride is not None or documents:
        check_rolling_protocols(restored, split, stride, documents, precision)
        restored.model.to(evaluation_device(cfg.trainer.accelerator))
    started = time.perf_counter()
    datamodule = _prepared_data(restored, path, split)
    metrics = {
        "protocol": f"non-overlapping windows of {cfg.data.block_size} tokens (the context "
        "restarts at every window, as in training's validation)",
        **_window_metrics(restored, datamodule, split, limit_batches, precision),
    }
    metrics["seconds"] = time.perf_counter() - started
    options = dict(batch_size=batch_size, precision=precision)
    if stride is not None:
        metrics["stride"] = stride_evaluation(restored, datamodule, split, stride, **options)
    if documents:
        doc_stride = stride or model_context(restored)
        metrics["documents"] = document_evaluation(
            restored, split, doc_stride, detokenized=detokenize, **options
        )
    return metrics


def check_rolling_protocols(restored: Restored, split, stride, documents: bool, precision) -> None:
    """What the rolling evaluations need, before the fixed windows' pass: a stride within the
    context, a precision they run, WikiText-2 (and its files) for documents."""
    check_precision_name(precision)
    if stride is not None:
        check_rolling(model_context(restored), stride)
    if not documents:
        return
    data = restored.config.data
    corpus = data.corpus if "corpus" in data else None
    if corpus != "wikitext2":
        raise ValueError(
            "eval.documents=true scores WikiText-2's articles, but this model was trained on "
            f"{corpus or 'other data'}; use eval.stride for its own data"
        )
    wikitext_split_file(data_root(), split)


def check_protocol_options(stride, documents: bool, limit_batches, batch_size: int) -> None:
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise ValueError(f"eval.stride={stride!r} must be a whole number of tokens >= 1, or null")
    if (stride is not None or documents) and limit_batches is not None:
        raise ValueError(
            "limit_batches applies to the non-overlapping windows only; the rolling evaluations "
            "(eval.stride, eval.documents) score the whole split: drop limit_batches"
        )
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size} must be >= 1")


def _prepared_data(restored: Restored, path: str, split: str):
    datamodule = build_datamodule(restored.config)
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
    return datamodule


def _window_metrics(
    restored: Restored, datamodule, split: str, limit_batches, precision: str
) -> dict[str, float]:
    cfg = restored.config
    # a fresh task around a fresh model: the task may wrap the model in modules of its own
    task = build_task(cfg, build_model(cfg, datamodule.vocab_size), datamodule)
    task.model.load_state_dict(restored.model.state_dict())
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        precision=precision,
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
