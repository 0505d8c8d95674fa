"""The n-gram baselines of a run: modified Kneser-Ney on the run's own tokens, and optionally on
the same text split into words (the word-level model of the literature)."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmkit.ngram import baseline_metrics, check_baseline_config
from lmkit.run.build import build_datamodule

log = logging.getLogger(__name__)


def check_baselines(cfg: DictConfig) -> None:
    """A bad order or discount fails before training, not after it."""
    if cfg.ngram.enabled:
        check_baseline_config(cfg.ngram.order, cfg.ngram.discount)


def run_baselines(cfg: DictConfig, datamodule) -> dict[str, Any]:
    """{"baseline": ..., "word_baseline": ...} as cfg.ngram asks, for results.json; {} when off
    or when the data is no token stream (MQAR)."""
    if not cfg.ngram.enabled:
        return {}
    if not datamodule.ngram_baseline:
        log.info("n-gram baseline: not applicable to %s", type(datamodule).__name__)
        return {}
    baseline = baseline_metrics(datamodule, cfg.ngram.order, cfg.ngram.discount)
    log_baseline("n-gram baseline", baseline)
    results = {"baseline": baseline}
    if cfg.ngram.word_level and cfg.tokenizer.kind != "word":
        try:
            results["word_baseline"] = word_level_baseline(cfg)
        except (OSError, ValueError) as error:  # the trained run's results still get written
            log.warning("word-level n-gram baseline skipped: %s", error)
    return results


def word_level_baseline(cfg: DictConfig) -> dict[str, Any]:
    """The n-gram of cfg.ngram fitted on the same data split into words (tokenizer=word: the
    train split's whitespace words plus end of line; words the train split lacks are <unk>),
    whose perplexity faces a BPE or char run's per-word one."""
    word_cfg = cfg.copy()  # a deep copy: the run's config keeps its tokenizer
    word_cfg.tokenizer = OmegaConf.create({"kind": "word"})
    word_cfg.data.block_size = 1  # the n-gram reads no windows; words are fewer than tokens
    baseline = baseline_metrics(build_datamodule(word_cfg), cfg.ngram.order, cfg.ngram.discount)
    log_baseline("word-level n-gram baseline", baseline)
    return baseline


def log_baseline(name: str, baseline: dict[str, Any]) -> None:
    splits = [s for s in ("val", "test") if s in baseline]
    log.info(
        "%s (KN%d): %s",
        name,
        baseline["order"],
        ", ".join(f"{s} ppl {baseline[s]['ppl']:.2f}" for s in splits),
    )
