"""Fit and score the n-gram baseline (interpolated Kneser-Ney) on the data of a config.

  python scripts/ngram.py data=wikitext2 tokenizer=word ngram.order=5
  python scripts/ngram.py ngram.order=7                          # Tiny Shakespeare characters
  python scripts/ngram.py data=wikitext2 tokenizer=bpe ngram.discount=single

Prints loss (nats per token), perplexity and bits per byte on val (and test), the fit and score
times and the memory. It always fits afresh (the figures are its point) and refreshes the cache
that scripts/train.py takes its baseline from.
"""

import tracemalloc

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.ngram import baseline_metrics
from lmkit.run.build import build_datamodule
from lmkit.run.cli import run_cli
from lmkit.run.runtime import peak_memory_mb


def fit_and_score(cfg: DictConfig) -> dict:
    datamodule = build_datamodule(cfg)
    datamodule.prepare()  # tokenizer and token ids first (cached): not part of the figures
    tracemalloc.start()  # numpy reports its arrays to tracemalloc: the n-gram work's own peak
    results = baseline_metrics(datamodule, cfg.ngram.order, cfg.ngram.discount, use_cache=False)
    results["peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return results


@hydra.main(config_path="../conf", config_name="ngram", version_base="1.3")
def main(cfg: DictConfig) -> None:
    r = run_cli(fit_and_score, cfg)
    data = cfg.data.get("corpus") or cfg.data.get("train")
    tokenizer = cfg.tokenizer.kind + (f" {v}" if (v := cfg.tokenizer.get("vocab_size")) else "")
    table = Table(title=f"KN{r['order']} ({r['discount']} discounts) on {data}, {tokenizer}")
    for column in ("split", "tokens", "loss", "ppl", "bpb", "score s"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in ("val", "test"):
        if split in r:
            m = r[split]
            table.add_row(
                split,
                f"{m['tokens']:,}",
                f"{m['loss']:.4f}",
                f"{m['ppl']:,.2f}",
                f"{m['bpb']:.4f}",
                f"{m['score_s']:.2f}",
            )
    console = Console()
    console.print(table)
    console.print(
        f"fit {r['fit_s']:.2f} s on {r['train_tokens']:,} train tokens; distinct n-grams per "
        f"order {r['ngrams']}; model {r['model_mb']:.1f} MiB; peak {r['peak_mb']:.0f} MiB for "
        f"the n-gram work, {peak_memory_mb():.0f} MiB for the process"
    )
    fallback = f" (orders {r['fallback']} use the fallback 0.5, 1, 1.5)" if r["fallback"] else ""
    console.print(f"discounts D1, D2, D3+ per order: {r['discounts']}{fallback}")


if __name__ == "__main__":
    main()
