"""Error types that cross layers: raised low in the stack, reported by the entry points."""

from __future__ import annotations


class DivergenceError(RuntimeError):
    """The loss or the gradients became non-finite; the weights were not updated with them."""


def divergence_message(step: int, what: str) -> str:
    """The one line a diverged run ends with: where, what, and what to change."""
    return (
        f"training diverged at step {step}: {what}. The weights were not updated with it; "
        f"checkpoints saved before this step are intact. Lower optim.optimizer.lr, raise "
        f"optim.warmup_steps or use trainer.precision=32-true"
    )


class MissingExtraError(ImportError):
    """An optional dependency (an extra of pyproject.toml) that a command needs is missing."""
