"""Compare the runs of a sweep: python scripts/compare.py sweep_dir=<sweep dir>

Writes <sweep dir>/report.md with a table per run (params, val/test perplexity, bits per byte,
tokens/s, peak memory, wall time, MQAR accuracy) plus the n-gram baseline row, and PNG plots:
val loss against step and wall time, layer throughput against sequence length (from bench.json
where runs measured it), MQAR accuracy against width. Runs that failed are listed with their
error. A multirun of scripts/train.py writes this report by itself when it ends.
"""

import hydra
from omegaconf import DictConfig

from lmkit.report import write_report
from lmkit.run.cli import run_cli


@hydra.main(config_path="../conf", config_name="compare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    report = run_cli(lambda: write_report(cfg.sweep_dir))
    print(report.read_text())
    print(f"written: {report}")


if __name__ == "__main__":
    main()
