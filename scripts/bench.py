"""Print measured costs of a config (figures, not assertions).

  python scripts/bench.py experiment=shakespeare_char_cpu bench.bare=true
  python scripts/bench.py model/mixer=linear runtime.compile=true bench.steps=30
  python scripts/bench.py model/mixer=softmax model.mixer.backend=tiled bench.what=[layer]
  python scripts/bench_mixers.py model.d_model=384 ...   # the train figures of every mixer

train: training steps of the config through lmkit's Lightning path (train.py's trainer and
callbacks, real data, no validation): median ms/step and tokens/s after warm-up, peak memory,
model FLOPs per token (lmkit.ops.flops: every mixer, MLP and head matmul), achieved FLOP/s, and
MFU against this machine's matmul peak, which bench measures itself (fp32 and bf16 GEMMs at the
model's shapes). bench.bare=true also runs the same model, data, optimizer and precision in a
plain PyTorch loop and prints the Lightning/bare throughput ratio: of each path's fastest run,
and the median and range of each round's back-to-back pair (lightning_over_bare and
lightning_over_bare_rounds in the saved figures).
layer: forward+backward ms and peak memory of one mixer layer (d_model of the config) per T.
decode: ms per generated token with the caches filled to each of bench.decode_positions
(positional tables are sized to fit; use model/embedding=rope or none for unbounded models).

Every option is a Hydra override (conf/bench.yaml lists and explains them: bench.steps=N,
bench.warmup=N, bench.rounds=N, ...); --help shows them, --cfg job prints the composed config.
bench.save=path/bench.json also writes the figures as JSON; a bench.json inside a sweep's job
folder feeds the throughput plot of scripts/compare.py. The code is in lmkit/run/bench.py.
"""

import hydra
from omegaconf import DictConfig

from lmkit.run.bench import run_bench
from lmkit.run.cli import run_cli


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_cli(run_bench, cfg)


if __name__ == "__main__":
    main()
