"""Medusa (Cai et al., 2024): look-ahead heads on a trained DecoderLM that propose a tree of
continuations, verified by the base model in one forward pass.

model.py: the heads and MedusaLM; task.py: training them (Medusa-1, Medusa-2, self-distillation);
tree.py: trees and their calibration; accept.py: the acceptance rules; decode.py: propose /
verify / accept, greedy or sampled; legacy.py: reading checkpoints written before this package
existed."""
