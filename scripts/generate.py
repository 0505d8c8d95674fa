"""Sample text from a trained checkpoint (prefill once, then one cached step per token).

  python scripts/generate.py ckpt=outputs/.../checkpoints/last.ckpt prompt="ROMEO:"
      [max_new_tokens=200] [temperature=0.8] [top_k=50] [top_p=null] [num_samples=1] [seed=0]

temperature=0 decodes greedily. Medusa (a checkpoint trained with experiment=medusa):

  python scripts/generate.py ckpt=... decoding=medusa temperature=0 [medusa.tree_nodes=8]
  python scripts/generate.py ckpt=... decoding=medusa medusa.acceptance=typical [temperature=0.8]
      [top_k=50] [top_p=null] [num_samples=1] [seed=0] [medusa.epsilon=0.09] [medusa.delta=0.3]

greedy acceptance (the default) reproduces greedy decoding exactly, so it takes temperature=0 and
one sample; typical is Medusa's rule, and samples its root and bonus tokens like decoding=sample
(the same seed, the same texts). Tokens per step and tokens/s are logged. Options and defaults:
conf/generate.yaml (--cfg job shows them).
"""

import hydra
from omegaconf import DictConfig

from lmkit.run.cli import run_cli
from lmkit.run.generate import generate_texts


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    for i, text in enumerate(run_cli(generate_texts, cfg)):
        if cfg.num_samples > 1:
            print(f"--- sample {i} ---")
        print(text)


if __name__ == "__main__":
    main()
