"""Export a checkpoint's weights to safetensors (config and tokenizer in the metadata).

python scripts/export.py ckpt=outputs/.../checkpoints/last.ckpt out=model.safetensors
"""

from lmkit.checkpoint import export_safetensors
from lmkit.cli import parse_key_values, run_cli

DEFAULTS = {"ckpt": "???", "out": "model.safetensors"}


def main() -> None:
    args = parse_key_values(DEFAULTS, __doc__)
    print(f"wrote {run_cli(export_safetensors, args.ckpt, args.out)}")


if __name__ == "__main__":
    main()
