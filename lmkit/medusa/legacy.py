"""Checkpoints written before Medusa was its own package: the heads lived in the DecoderLM
(`model.medusa_heads`, weights under `model.medusa.`) and their options in a `medusa` section."""

from __future__ import annotations

TASK = "lmkit.medusa.task.MedusaTask"
OPTIONS = ("loss_decay", "joint", "base_lr_scale", "distill_prompt")


def upgrade_legacy_medusa(checkpoint: dict) -> None:
    """Move a legacy checkpoint's heads into today's layout, in place: the task becomes a
    MedusaTask with the run's Medusa options, the weights move from DecoderLM.medusa to
    MedusaLM.heads and the base's under MedusaLM.base. Plain models only lose the key."""
    config = checkpoint["lmkit"]["config"]
    heads = int(config["model"].pop("medusa_heads", 0) or 0)
    options = config.pop("medusa", None) or {}
    if not heads:
        return
    config["task"].update(_target_=TASK, heads=heads)
    # the run's own options; a key the old section lacks takes MedusaTask's default
    config["task"].update({k: v for k, v in options.items() if k in OPTIONS})
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {_new_key(k): v for k, v in state.items()}


def _new_key(key: str) -> str:
    if key.startswith("model.medusa.heads."):
        return "model.heads." + key[len("model.medusa.heads.") :]
    if key.startswith("model."):
        return "model.base." + key[len("model.") :]
    return key
