"""Sample text from a trained checkpoint (prefill once, then one cached step per token).

  python scripts/generate.py ckpt=outputs/.../checkpoints/last.ckpt prompt="ROMEO:"
      [max_new_tokens=200] [temperature=0.8] [top_k=50] [top_p=null] [num_samples=1] [seed=0]

temperature=0 decodes greedily.
"""

import torch

from lmkit.checkpoint import restore
from lmkit.cli import parse_key_values, run_cli

DEFAULTS = {
    "ckpt": "???",
    "prompt": "\n",
    "max_new_tokens": 200,
    "temperature": 0.8,
    "top_k": 50,
    "top_p": None,
    "num_samples": 1,
    "seed": 0,
}


def sample(args) -> list[str]:
    restored = restore(args.ckpt)
    ids = restored.tokenizer.encode(str(args.prompt))
    if not ids:
        raise ValueError("prompt encodes to no tokens; give a non-empty prompt")
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    generator = torch.Generator().manual_seed(args.seed)
    out = restored.model.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
    )
    return [restored.tokenizer.decode(row.tolist()) for row in out]


def main() -> None:
    args = parse_key_values(DEFAULTS, __doc__)
    for i, text in enumerate(run_cli(sample, args)):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(text)


if __name__ == "__main__":
    main()
