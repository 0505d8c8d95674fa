"""Sample text from a trained checkpoint (prefill once, then one cached step per token).

  python scripts/generate.py ckpt=outputs/.../checkpoints/last.ckpt prompt="ROMEO:"
      [max_new_tokens=200] [temperature=0.8] [top_k=50] [top_p=null] [num_samples=1] [seed=0]

temperature=0 decodes greedily.

Medusa (a checkpoint trained with experiment=medusa):
  python scripts/generate.py ckpt=... decoding=medusa [acceptance=greedy|typical]
      [tree_nodes=8] [epsilon=0.09] [delta=0.3]
greedy acceptance reproduces greedy decoding exactly; typical samples-like (Medusa's rule). The
tree is calibrated on the checkpoint's val text (greedy acceptance: on the model's greedy
continuations of it). Tokens per step and tokens/s are printed.
"""

import sys

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
    "decoding": "sample",
    "acceptance": "greedy",
    "tree_nodes": 8,  # fastest on this CPU, where every verified node costs compute
    "epsilon": 0.09,
    "delta": 0.3,
}


def medusa_sample(args, restored, prompt) -> list[str]:
    from lmkit.decoding.medusa import (
        calibrate_tree,
        calibration_text,
        calibration_windows,
        medusa_generate,
    )
    from lmkit.training import build_datamodule

    datamodule = build_datamodule(restored.config)
    datamodule.prepare()
    windows = calibration_windows(datamodule, 16)
    calibration = calibration_text(restored.model, windows, args.acceptance)
    tree = calibrate_tree(restored.model, calibration, args.tree_nodes)
    texts = []
    for row in prompt:
        tokens, stats = medusa_generate(
            restored.model,
            row.unsqueeze(0),
            args.max_new_tokens,
            tree=tree,
            acceptance=args.acceptance,
            temperature=max(args.temperature, 1e-6),
            epsilon=args.epsilon,
            delta=args.delta,
        )
        texts.append(restored.tokenizer.decode(tokens[0].tolist()))
        print(
            f"medusa: {stats.tokens_per_step:.2f} tokens/step over {stats.steps} steps, "
            f"{stats.tokens_per_s:,.0f} tokens/s ({len(tree)}-node tree, {args.acceptance})",
            file=sys.stderr,
        )
    return texts


def sample(args) -> list[str]:
    restored = restore(args.ckpt)
    ids = restored.tokenizer.encode(str(args.prompt))
    if not ids:
        raise ValueError("prompt encodes to no tokens; give a non-empty prompt")
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    if args.decoding == "medusa":
        return medusa_sample(args, restored, prompt)
    if args.decoding != "sample":
        raise ValueError(f"decoding={args.decoding!r}; choose sample or medusa")
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
