"""A checkpoint as a model folder: model.safetensors, config.json, tokenizer.json, README.md.

  python scripts/export.py ckpt=outputs/.../checkpoints/last.ckpt out=models/my-model
  python scripts/export.py ckpt=... out=models/my-model push=true repo_id=me/my-model

The folder loads back with scripts/evaluate.py / generate.py / lm_eval.py ckpt=models/my-model
(or lmkit.run.checkpoint.restore), its tokenizer with transformers.PreTrainedTokenizerFast
(tokenizer_file=...). push=true uploads it with huggingface_hub (log in first: hf auth login).
Options and defaults: conf/export.yaml (--cfg job shows them).
"""

import hydra
from omegaconf import DictConfig

from lmkit.run.cli import run_cli
from lmkit.run.export import export_folder


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    folder = run_cli(
        lambda: export_folder(
            cfg.ckpt, cfg.out, push=cfg.push, repo_id=cfg.repo_id, private=cfg.private
        )
    )
    print(f"wrote {folder}" + (f" and pushed it to {cfg.repo_id}" if cfg.push else ""))


if __name__ == "__main__":
    main()
