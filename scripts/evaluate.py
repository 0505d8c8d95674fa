"""Perplexity, bits per byte and accuracy of a trained model on a split of its own data.

  python scripts/evaluate.py ckpt=outputs/.../checkpoints/last.ckpt [split=val|test]
                             [limit_batches=N] [precision=32-true]
  python scripts/evaluate.py ckpt=... eval.stride=128          # also rolling windows
  python scripts/evaluate.py ckpt=... split=test eval.documents=true   # also WikiText-2 articles
                                                                      # as lm-evaluation-harness

ckpt is a checkpoint or a folder written by scripts/export.py; either carries its config and
tokenizer, and the corpus is read from LMKIT_DATA_DIR. The result names the protocol behind each
figure (docs/evaluation.md). Options and defaults: conf/evaluate.yaml (--cfg job shows them).
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmkit.run.cli import run_cli
from lmkit.run.evaluate import evaluate_checkpoint


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    metrics = run_cli(
        lambda: evaluate_checkpoint(
            cfg.ckpt,
            cfg.split,
            limit_batches=cfg.limit_batches,
            precision=cfg.precision,
            stride=cfg.eval.stride,
            documents=cfg.eval.documents,
            detokenize=cfg.eval.detokenize,
            batch_size=cfg.eval.batch_size,
        )
    )
    text = json.dumps({"split": cfg.split, "ckpt": str(cfg.ckpt), **metrics}, indent=2)
    if cfg.out:
        Path(cfg.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
