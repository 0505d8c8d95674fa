"""Perplexity, bits per byte and accuracy of a trained checkpoint on a split of its own data.

  python scripts/evaluate.py ckpt=outputs/.../checkpoints/last.ckpt [split=val|test]
                             [limit_batches=N] [precision=32-true]

The checkpoint carries its config and tokenizer; the corpus is read from LMKIT_DATA_DIR.
Options and defaults: conf/evaluate.yaml (--cfg job shows them).
"""

import json

import hydra
from omegaconf import DictConfig

from lmkit.run.cli import run_cli
from lmkit.run.evaluate import evaluate_checkpoint


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    metrics = run_cli(
        lambda: evaluate_checkpoint(
            cfg.ckpt, cfg.split, limit_batches=cfg.limit_batches, precision=cfg.precision
        )
    )
    print(json.dumps({"split": cfg.split, **metrics}, indent=2))


if __name__ == "__main__":
    main()
