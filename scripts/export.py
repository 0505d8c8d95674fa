"""Export a checkpoint's weights to safetensors (config and tokenizer in the metadata).

  python scripts/export.py ckpt=outputs/.../checkpoints/last.ckpt out=model.safetensors
"""

import hydra
from omegaconf import DictConfig

from lmkit.run.checkpoint import export_safetensors
from lmkit.run.cli import run_cli


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(f"wrote {run_cli(lambda: export_safetensors(cfg.ckpt, cfg.out))}")


if __name__ == "__main__":
    main()
