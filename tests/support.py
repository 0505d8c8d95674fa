"""Helpers shared by the tests: the repo's paths and tiny configs composed as the scripts do."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A tiny model and short run: enough to test every moving part in seconds on 2 cores.
TINY = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "data.block_size=32",
    "data.batch_size=4",
    "trainer.max_steps=20",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=4",
    "trainer.limit_test_batches=4",
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "trainer.log_every_n_steps=5",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "optim.warmup_steps=2",
]


def compose_config(
    *overrides: str, tiny: bool = True, run_dir: Path | str | None = None
) -> DictConfig:
    """The config scripts/train.py would see for these overrides (Hydra's compose API)."""
    args = (TINY if tiny else []) + list(overrides)
    if run_dir is not None:
        args.append(f"run_dir={run_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=args)


def uses_rotary(mixer: str) -> bool:
    """Whether a mixer config takes rotary positions (mixers without q/k, like Mamba, do not)."""
    cfg = compose_config(f"model/mixer={mixer}", run_dir="/tmp/unused")
    return "rotary" in inspect.signature(instantiate(cfg.model.mixer).func).parameters


def run_in_pieces(layer, x, cache, sizes):
    """layer's output for x [B, T, D] fed through `cache` in pieces of `sizes` tokens (a prefill,
    single steps, longer continuations), concatenated along time."""
    out, pos = [], 0
    for n in sizes:
        out.append(layer(x[:, pos : pos + n], cache))
        pos += n
    assert pos == x.shape[1], f"the pieces {sizes} cover {pos} of {x.shape[1]} tokens"
    return torch.cat(out, 1)


# ---- small corpora of many documents (data=hf) ---------------------------------------------

WORDS = "the a cat dog sat on mat ran far and then it was good bad day night king queen".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(rng.randint(1, 4))
        ]
        docs.append(f"Story {i}.\n" + "\n".join(lines) + "\n")
    return docs


def write_parquet(folder: Path, docs: list[str], parts: int, column: str = "text") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, chunk in enumerate(np.array_split(np.arange(len(docs)), parts)):
        table = pa.table({column: [docs[i] for i in chunk], "id": [int(i) for i in chunk]})
        pq.write_table(table, folder / f"part-{k}.parquet")


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({column: doc, "id": i}) + "\n")
