"""Tokenize a config's data once into its token cache, without training.

  python scripts/prepare_data.py data=hf data.path=parquet data.data_files='dump/*.parquet' \
      tokenizer=bpe tokenizer.vocab_size=32000
  python scripts/prepare_data.py data=hf data.path=roneneldan/TinyStories \
      data.val_split=validation tokenizer=bpe

Takes the same overrides as scripts/train.py, which prepares the same cache itself when it is
missing. A killed preparation keeps its finished shards and continues where it stopped when run
again. Prints the splits' documents, tokens and shards and where the cache is.
"""

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.run.build import build_datamodule
from lmkit.run.cli import run_cli


def prepare(cfg: DictConfig):
    datamodule = build_datamodule(cfg)
    datamodule.prepare()
    return datamodule


@hydra.main(config_path="../conf", config_name="prepare_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    datamodule = run_cli(prepare, cfg)
    splits = datamodule.meta.get("splits") or {
        s: {"tokens": n} for s, n in datamodule.meta["tokens"].items()
    }
    table = Table(title=f"token cache {datamodule.cache_dir}")
    for column in ("split", "documents", "tokens", "bytes", "shards"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, info in splits.items():
        table.add_row(
            split,
            f"{info['documents']:,}" if "documents" in info else "1",
            f"{info['tokens']:,}",
            f"{info.get('bytes', datamodule.meta.get('bytes', {}).get(split, 0)):,}",
            str(len(info.get("shards", [None]))),
        )
    console = Console()
    console.print(table)
    console.print(
        f"tokenizer {datamodule.tokenizer.kind}, {datamodule.vocab_size:,} ids; "
        + ("found in the cache" if datamodule.cache_hit else "prepared now")
    )


if __name__ == "__main__":
    main()
