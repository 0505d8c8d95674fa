"""Compare the runs of a sweep: python scripts/compare.py <sweep dir>

Writes <sweep dir>/report.md with a table per run (params, val/test perplexity, bits per byte,
tokens/s, peak memory, wall time, MQAR accuracy) plus the n-gram baseline row, and PNG plots:
val loss against step and wall time, layer throughput against sequence length (from bench.json
where runs measured it), MQAR accuracy against width. Runs that failed are listed with their
error. A multirun of scripts/train.py writes this report by itself when it ends.
"""

import sys

from lmkit.cli import run_cli
from lmkit.report import write_report


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    report = run_cli(write_report, argv[0])
    print(report.read_text())
    print(f"written: {report}")


if __name__ == "__main__":
    main(sys.argv[1:])
