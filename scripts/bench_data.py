"""The sharded data path measured: preparation throughput and memory, and training speed.

  python scripts/bench_data.py                                   # both parts, default sizes
  python scripts/bench_data.py what=[prepare] corpus_mb=[512,2048]
  python scripts/bench_data.py what=[train] rounds=3

prepare: a parquet dump of WikiText-2's articles repeated to each size in corpus_mb is prepared
with data=hf (byte-level BPE, every core) in a child process, then the same documents are
encoded by one process calling the tokenizers library's encode_batch (its own threads on every
core) with the prepared tokenizer. Prints tokens/s of both and the peak RSS of the preparation
(its main process and its largest worker), which must not grow with the corpus.

train: training tokens/s (scripts/bench.py bench.what=[train]) of Tiny Shakespeare through
today's single-file cache (data=tinyshakespeare) and through data=hf token shards (the same
text as a parquet of its speeches, cut into ~10 shards), alternating, at each experiment in
train_experiments.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.data.corpora import data_root, read_text
from lmkit.run.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


# ---- corpora ---------------------------------------------------------------------------------


def wikitext_articles() -> list[str]:
    """WikiText-2's train articles: a document starts at each top-level ' = Title = ' line."""
    text = read_text(data_root() / "wikitext-2" / "train.txt")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = \n", text, flags=re.M)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]


def write_dump(folder: Path, documents: list[str], megabytes: int) -> Path:
    """Parquet files of `documents` repeated until `megabytes` of text, 64 MB per file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    sizes = np.array([len(d.encode()) for d in documents])
    per_file = 64 * 2**20
    written, part = 0, 0
    while written < megabytes * 2**20:
        rows, size = [], 0
        while size < per_file and written + size < megabytes * 2**20:
            for doc, n in zip(documents, sizes, strict=True):
                rows.append(doc)
                size += int(n)
        pq.write_table(pa.table({"text": rows}), folder / f"part-{part:04d}.parquet")
        written, part = written + size, part + 1
    return folder


def shakespeare_speeches(folder: Path) -> Path:
    """Tiny Shakespeare as a parquet of its speeches (paragraphs between blank lines)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = read_text(data_root() / "tinyshakespeare" / "input.txt")
    speeches = [s + "\n" for s in text.split("\n\n") if s.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": speeches}), folder / "speeches.parquet")
    return folder


# ---- preparation -----------------------------------------------------------------------------

PREPARE = """
import json, os, resource, time
import datasets
from lmkit.data.hf_datamodule import HFDataModule
from lmkit.run.private_memory import PeakPrivateMemory, private_mb
tokenizer = {{"kind": "bpe", "vocab_size": {vocab}}}
dm = HFDataModule("parquet", data_files={files!r}, tokenizer=tokenizer, block_size=256,
                  prepare={options!r}, streaming={streaming})
before, sampler, start = private_mb(os.getpid()), PeakPrivateMemory(0.05), time.perf_counter()
dm.prepare()
wall = time.perf_counter() - start
print(json.dumps({{
    "wall_s": wall, "tokens": sum(dm.meta["tokens"].values()), "cache": str(dm.cache_dir),
    "private_before_mb": before, "private_peak_mb": sampler.stop(),
    "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}}))
"""

ENCODE_BATCH = """
import json, resource, time
import pyarrow.parquet as pq, tokenizers
from pathlib import Path
tok = tokenizers.Tokenizer.from_file({tokenizer!r})
start, tokens = time.perf_counter(), 0
for path in sorted(Path({folder!r}).glob("*.parquet")):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1000, columns=["text"]):
        texts = [t for t in batch.column(0).to_pylist() if t]
        tokens += sum(len(e.ids) + 1 for e in tok.encode_batch(texts, add_special_tokens=False))
print(json.dumps({{"wall_s": time.perf_counter() - start, "tokens": tokens,
                  "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def child(code: str, cache: Path) -> dict:
    """Run `code` in a fresh process (its own peak RSS) with its own cache; its last line."""
    env = {**os.environ, "LMKIT_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare_figures(cfg: DictConfig, work: Path, console: Console) -> list[dict]:
    articles = wikitext_articles()
    rows = []
    for megabytes in cfg.corpus_mb:
        folder = write_dump(work / f"dump{megabytes}", articles, megabytes)
        options = {"workers": cfg.workers, "tokenizer_sample_bytes": cfg.sample_mb * 2**20}
        files = str(folder / "*.parquet")
        cache = work / f"cache{megabytes}"
        code = PREPARE.format(
            files=files, vocab=cfg.vocab_size, options=options, streaming=cfg.streaming
        )
        prepared = child(code, cache)
        tokenizer = str(Path(prepared["cache"]) / "tokenizer.json")
        baseline = child(ENCODE_BATCH.format(tokenizer=tokenizer, folder=str(folder)), cache)
        row = {"corpus_mb": megabytes, "prepare": prepared, "encode_batch": baseline}
        rows.append(row)
        p, b = prepared, baseline
        console.print(
            f"{megabytes} MB: data=hf {p['tokens'] / p['wall_s']:,.0f} tokens/s "
            f"({p['wall_s']:.0f} s,"
            f" peak private memory {p['private_peak_mb']:.0f} MB, {p['private_before_mb']:.0f} "
            f"before; peak RSS {p['rss_main_mb']:.0f} MB, a worker's {p['rss_worker_mb']:.0f} MB); "
            f"encode_batch {b['tokens'] / b['wall_s']:,.0f} tokens/s ({b['wall_s']:.0f} s, "
            f"peak RSS {b['rss_main_mb']:.0f} MB)"
        )
    return rows


# ---- training --------------------------------------------------------------------------------


def train_tokens_per_s(experiment: str | None, data: list[str], save: Path, steps: int) -> float:
    chosen = [f"experiment={experiment}"] if experiment else []  # None: the default config
    cmd = [
        sys.executable, "scripts/bench.py", *chosen, *data,
        "bench.what=[train]", f"bench.steps={steps}", "bench.rounds=1", f"bench.save={save}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return float(json.loads(save.read_text())["train"]["tokens_per_s"])


def train_figures(cfg: DictConfig, work: Path, console: Console) -> list[dict]:
    folder = shakespeare_speeches(work / "speeches")
    paths = {
        "memmap": ["data=tinyshakespeare"],
        "shards": [
            "data=hf", "data.path=parquet", f"data.data_files={folder}/*.parquet",
            "data.holdout.val=0.1", "data.prepare.shard_tokens=100000",
        ],
    }  # fmt: skip
    rows = []
    for experiment in cfg.train_experiments:
        # the data group is swapped under the experiment; block_size and batch_size stay its own
        figures: dict[str, list[float]] = {name: [] for name in paths}
        for round_ in range(cfg.rounds):
            order = list(paths.items())
            for name, data in order if round_ % 2 == 0 else order[::-1]:  # ABBA: no order bias
                save = work / f"{experiment or 'default'}-{name}.json"
                figures[name].append(train_tokens_per_s(experiment, data, save, cfg.train_steps))
        medians = {name: statistics.median(v) for name, v in figures.items()}
        ratio = medians["shards"] / medians["memmap"]
        rows.append({"experiment": experiment or "default", **figures, "shards_over_memmap": ratio})
        console.print(
            f"{experiment or 'default config'}: memmap {figures['memmap']}, shards "
            f"{figures['shards']} tokens/s; median shards / memmap {ratio:.3f}"
        )
    return rows


def bench_data(cfg: DictConfig) -> dict:
    console = Console()
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="bench_data-"))
    results: dict = {"work_dir": str(work)}
    started = time.perf_counter()
    if "prepare" in cfg.what:
        results["prepare"] = prepare_figures(cfg, work, console)
    if "train" in cfg.what:
        results["train"] = train_figures(cfg, work, console)
    results["wall_s"] = time.perf_counter() - started
    return results


@hydra.main(config_path="../conf", config_name="bench_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    results = run_cli(bench_data, cfg)
    table = Table(title="data=hf preparation against one encode_batch process")
    for column in ("corpus", "data=hf tokens/s", "encode_batch tokens/s", "peak private MB"):
        table.add_column(column, justify="right")
    for row in results.get("prepare", []):
        p, b = row["prepare"], row["encode_batch"]
        table.add_row(
            f"{row['corpus_mb']} MB",
            f"{p['tokens'] / p['wall_s']:,.0f}",
            f"{b['tokens'] / b['wall_s']:,.0f}",
            f"{p['private_peak_mb']:.0f} (before {p['private_before_mb']:.0f})",
        )
    Console().print(table)
    if cfg.save:
        Path(cfg.save).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
