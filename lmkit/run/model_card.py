"""The README.md of an exported model folder: what the model is, what it was trained on, and the
figures its run measured (with the n-gram baseline on the same tokens)."""

from __future__ import annotations

from omegaconf import DictConfig

from lmkit.run.checkpoint import Restored

METRICS = (
    ("loss", "loss (nats/token)"),
    ("ppl", "perplexity"),
    ("bpb", "bits/byte"),
    ("word_ppl", "perplexity/word"),
)


def model_card(restored: Restored, results: dict | None) -> str:
    """Markdown with Hub front matter; `results` is the run's results.json (None: not known)."""
    cfg = restored.config
    mixer = _short(cfg.model.mixer._target_) if "mixer" in cfg.model else "?"
    lines = [
        "---",
        "library_name: lmkit",
        f"tags: [lmkit, causal-lm, {mixer}]",
        "---",
        "",
        f"# {_short(cfg.model._target_)} with {mixer} mixing, trained with lmkit",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _facts(restored).items()),
        "",
        *_figures(cfg, results),
        *_usage(),
    ]
    return "\n".join(lines) + "\n"


def _facts(restored: Restored) -> dict[str, str]:
    cfg, model = restored.config, restored.model
    base = getattr(model, "base", model)  # Medusa wraps the language model
    facts = {
        "model": f"`{cfg.model._target_}`, {base.num_layers} blocks, d_model {base.d_model}",
        "mixer": f"`{cfg.model.mixer._target_}`" if "mixer" in cfg.model else "-",
        "parameters": f"{base.num_params():,} ({base.num_params(non_embedding=True):,} "
        "non-embedding)",
        "tokenizer": f"{restored.tokenizer.kind}, {restored.tokenizer.vocab_size:,} tokens",
        "data": f"{_data_name(cfg)}, windows of {cfg.data.block_size} tokens",
        "trained": f"{restored.global_step:,} optimizer steps",
    }
    if base is not model:
        facts["task"] = f"`{cfg.task._target_}` ({len(model.heads)} draft heads)"
    return facts


def _figures(cfg: DictConfig, results: dict | None) -> list[str]:
    if results is None:
        return [
            "No evaluation of these weights was recorded with the checkpoint; measure one with",
            "`python scripts/evaluate.py ckpt=<this folder>`.",
            "",
        ]
    lines = [
        f"Trained on {results['tokens']:,} tokens." if results.get("tokens") else "",
        "",
        f"## Evaluation (the run's results.json: non-overlapping windows of "
        f"{cfg.data.block_size} tokens)",
        "",
        "| split | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for split in ("val", "test"):
        if f"{split}_loss" in results:
            row = [_fmt(results.get(f"{split}_{key}")) for key, _ in METRICS]
            lines.append(f"| {split} | " + " | ".join(row) + " |")
    for key, title in (("baseline", "tokens"), ("word_baseline", "words")):
        if key in results:
            lines += ["", *_baseline(results[key], title)]
    return [*lines, ""]


def _baseline(baseline: dict, unit: str) -> list[str]:
    lines = [
        f"n-gram baseline on the same {unit}: modified Kneser-Ney, order "
        f"{baseline.get('order', '?')} (full history, no window borders)",
        "",
        "| split | loss | perplexity | bits/byte |",
        "|---|---|---|---|",
    ]
    for split in ("val", "test"):
        if isinstance(baseline.get(split), dict):
            m = baseline[split]
            lines.append(
                f"| {split} | {_fmt(m.get('loss'))} | {_fmt(m.get('ppl'))} | {_fmt(m.get('bpb'))} |"
            )
    return lines


def _usage() -> list[str]:
    return [
        "## Use",
        "",
        "```",
        "python scripts/evaluate.py ckpt=<this folder> [split=test] [eval.stride=128]",
        "python scripts/generate.py ckpt=<this folder> prompt='...'",
        "python scripts/lm_eval.py ckpt=<this folder> tasks=[wikitext]",
        "```",
        "",
        "```python",
        "from lmkit.run.checkpoint import restore",
        "restored = restore('<this folder>')  # .model, .tokenizer, .config",
        "```",
    ]


def _data_name(cfg: DictConfig) -> str:
    data = cfg.data
    return str(data.get("corpus") or data.get("train") or _short(data._target_))


def _short(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.4g}" if isinstance(value, float) else str(value)
