"""Perplexity and bits per byte of a trained checkpoint.

  python scripts/evaluate.py ckpt=outputs/.../checkpoints/last.ckpt [split=val|test]
                             [limit_batches=N] [precision=32-true]

The checkpoint carries its config and tokenizer; the corpus is read from LMKIT_DATA_DIR.
"""

import json

from lmkit.cli import parse_key_values, run_cli
from lmkit.evaluation import evaluate_checkpoint

DEFAULTS = {"ckpt": "???", "split": "val", "limit_batches": None, "precision": None}


def main() -> None:
    args = parse_key_values(DEFAULTS, __doc__)
    metrics = run_cli(
        evaluate_checkpoint,
        args.ckpt,
        args.split,
        limit_batches=args.limit_batches,
        precision=args.precision,
    )
    print(json.dumps({"split": args.split, **metrics}, indent=2))


if __name__ == "__main__":
    main()
