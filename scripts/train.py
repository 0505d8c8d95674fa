"""Train a decoder-only LM: python scripts/train.py [group=option ...] [key=value ...]

Examples:
  python scripts/train.py experiment=shakespeare_char_cpu
  python scripts/train.py model/mixer=flash trainer.max_steps=500 data.block_size=128
  python scripts/train.py -m model/mixer=softmax,flash
"""

import hydra
from omegaconf import DictConfig

from lmkit.cli import run_cli
from lmkit.training import train


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    results = run_cli(train, cfg)
    return results.get("val_loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
