"""lmkit models in lm-evaluation-harness (the optional `eval` extra)."""
