"""Train a decoder-only LM: python scripts/train.py [group=option ...] [key=value ...]

Examples:
  python scripts/train.py experiment=shakespeare_char_cpu
  python scripts/train.py model/mixer=flash trainer.max_steps=500 data.block_size=128
  python scripts/train.py -m model/mixer=softmax,flash
"""

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from lmkit.cli import run_cli
from lmkit.training import train


def print_summary(results: dict) -> None:
    table = Table(title="results")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:,.4f}" if value < 100 else f"{value:,.0f}")
        elif isinstance(value, int | str):
            table.add_row(key, f"{value:,}" if isinstance(value, int) else value)
    Console().print(table)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    results = run_cli(train, cfg)
    print_summary(results)
    return results.get("val_loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
