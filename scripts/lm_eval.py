"""A trained model through lm-evaluation-harness (the optional extra: pip install -e ".[eval]").

  python scripts/lm_eval.py ckpt=outputs/.../checkpoints/last.ckpt tasks=[wikitext]
  python scripts/lm_eval.py ckpt=models/my-model tasks=[my_task] include_path=my_tasks/ limit=100

ckpt is a checkpoint or a folder written by scripts/export.py. The context is the block_size the
model trained with; documents longer than it roll with windows advancing `stride` tokens. lmkit's
tokenizers have no end-of-text token: a document's first token is scored after a newline.
Prints the harness's table (stderr) and its per-task figures as JSON (stdout). Options and
defaults: conf/lm_eval.yaml (--cfg job shows them).
"""

import json
import sys
from pathlib import Path

# Run as a script, this folder is first on sys.path and this file would shadow the lm_eval package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lmkit.run.cli import run_cli  # noqa: E402
from lmkit.run.harness import run_harness  # noqa: E402


@hydra.main(config_path="../conf", config_name="lm_eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(json.dumps(run_cli(run_harness, cfg), indent=2, default=str))


if __name__ == "__main__":
    main()
