"""Train a decoder-only LM: python scripts/train.py [group=option ...] [key=value ...]

Examples:
  python scripts/train.py experiment=shakespeare_char_cpu
  python scripts/train.py model/mixer=flash trainer.max_steps=500 data.block_size=128
  python scripts/train.py -m model/mixer=softmax,flash
  python scripts/train.py -m experiment=mixer_sweep     # every mixer, then report.md + plots

In a multirun (-m) a failing job writes error.json into its folder and the sweep goes on; the
report written at the end (scripts/compare.py) lists it with its error.
"""

from pathlib import Path

from lmkit.run import phases  # noqa: F401  first: its clock starts before the heavy imports

# isort: split
import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.run.cli import run_cli
from lmkit.run.sweep import is_multirun, run_sweep_job
from lmkit.run.train import train


def fmt(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else value


def print_summary(results: dict) -> None:
    """The flat results, with the n-gram baseline's val/test loss, ppl and bpb beside them (and
    the word-level n-gram's perplexity beside the per-word perplexity, where it was fitted)."""
    baseline = results.get("baseline") or {}
    words = results.get("word_baseline") or {}
    table = Table(title="results")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if baseline:
        table.add_column(f"KN{baseline['order']} baseline", justify="right")
    if words:
        table.add_column(f"KN{words['order']} word-level", justify="right")
    for key, value in results.items():
        if isinstance(value, float | int | str):
            split, _, metric = key.partition("_")
            same = (baseline.get(split) or {}).get(metric) if baseline else None
            extra = [fmt(same) if same is not None else ""] if baseline else []
            if words:
                word_ppl = (words.get(split) or {}).get("ppl") if metric == "word_ppl" else None
                extra.append(fmt(word_ppl) if word_ppl is not None else "")
            table.add_row(key, fmt(value), *extra)
    Console().print(table)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    if is_multirun():
        results = run_sweep_job(train, cfg, Path(cfg.run_dir))
        if results is None:
            return None  # recorded in error.json; an Optuna trial counts it as failed
    else:
        results = run_cli(train, cfg)
    print_summary(results)
    return results.get("val_loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
