"""Training Medusa heads: Medusa-1 (base frozen), Medusa-2 (base and heads, the base at a lower
learning rate) and self-distillation (the heads learn the base's own greedy text)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmkit.decoding.sampling import greedy_continuations
from lmkit.evaluation import IGNORE_INDEX, correct_count
from lmkit.medusa.model import MedusaLM, head_targets
from lmkit.task import LanguageModelTask, masked_mean_nll


class MedusaTask(LanguageModelTask):
    """A LanguageModelTask whose model is `model` with `heads` Medusa heads (a MedusaLM).

    Head k's loss weighs loss_decay^k. joint=false (Medusa-1) freezes the base and trains the
    heads only; joint=true (Medusa-2) also trains the base on its LM loss, at base_lr_scale
    times the heads' learning rate. distill_prompt > 0 replaces each training window by the
    base's greedy continuation of its first distill_prompt tokens (Medusa-1 only; block_size,
    the training windows' length, bounds it). Evaluation adds each head's top-1 accuracy
    (`medusa{k}_acc`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        heads: int = 4,
        loss_decay: float = 0.8,
        joint: bool = False,
        base_lr_scale: float = 0.1,
        distill_prompt: int = 0,
        block_size: int | None = None,
        **task_options,
    ) -> None:
        if not 0 <= distill_prompt < (block_size or distill_prompt + 1):
            raise ValueError(
                f"task.distill_prompt={distill_prompt} must be in [0, {block_size}) (0: off): "
                f"the windows of {block_size} tokens continue their first distill_prompt tokens"
            )
        if distill_prompt and joint:
            raise ValueError(
                "task.distill_prompt trains the heads on the frozen base's own greedy text; with "
                "task.joint=true (Medusa-2) the base would learn from itself. Add "
                "task.distill_prompt=0 to train both on the data"
            )
        super().__init__(MedusaLM(model, heads), **task_options)
        self.loss_decay, self.joint = loss_decay, joint
        self.base_lr_scale, self.distill_prompt = base_lr_scale, distill_prompt
        if not joint:
            self.model.base.requires_grad_(False)

    def training_loss(self, x: Tensor, y: Tensor, logging: bool) -> Tensor:
        if self.distill_prompt:
            x, y = self.greedy_windows(x)
        h = self.model.hidden_states(x)
        if self.joint or (logging and not self.distill_prompt):
            base = masked_mean_nll(self.model.head(h), y)
        if logging and not self.distill_prompt:  # on its own greedy text it means little
            self.log("train/loss", base, prog_bar=True)  # the LM's own loss, as in every run
        loss = base if self.joint else h.new_zeros(())
        for k, logits in enumerate(self.model.heads(h), start=1):
            head_loss = masked_mean_nll(logits, head_targets(y, k))
            if logging:
                self.log(f"train/medusa{k}_loss", head_loss)
            loss = loss + self.loss_decay**k * head_loss
        if logging:
            self.log("train/medusa_loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def greedy_windows(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Self-distillation (Cai et al., 2024, sec. 2.3.2): the windows x [B, T] become the base
        model's greedy continuations of their first distill_prompt tokens -> (inputs, targets),
        each [B, T - 1]. Greedy acceptance keeps a head's token only when it equals the base's
        own argmax, so these are the targets that count at decoding. Targets inside the prompt
        (data, not the model's choice) are IGNORE_INDEX."""
        # in the weights' own precision, as decoding runs: autocast could change the argmax
        with torch.autocast(x.device.type, enabled=False):
            sequence = greedy_continuations(self.model.base, x, self.distill_prompt)
        targets = sequence[:, 1:].clone()
        targets[:, : self.distill_prompt - 1] = IGNORE_INDEX
        return sequence[:, :-1], targets

    def parameter_groups(self) -> list[dict]:
        """Medusa-2: the pretrained base moves more slowly than the new heads."""
        groups = super().parameter_groups()
        if not (self.joint and self.lr):
            return groups
        heads = {id(p) for p in self.model.heads.parameters()}
        base_lr = self.lr * self.base_lr_scale
        split = [
            {**g, "params": [p for p in g["params"] if (id(p) in heads) == is_head]}
            | ({} if is_head else {"lr": base_lr})
            for is_head in (True, False)
            for g in groups
        ]
        return [g for g in split if g["params"]]

    def eval_counts(self, h: Tensor, y: Tensor) -> Tensor:
        """Each head's top-1 hits and scored positions."""
        counts = []
        for k, logits in enumerate(self.model.heads(h), start=1):
            yk = head_targets(y, k)
            counts += [correct_count(logits, yk), (yk != IGNORE_INDEX).sum().double()]
        return torch.stack(counts)

    def eval_metrics(self, sums: Tensor) -> dict[str, float]:
        return {
            f"medusa{k}_acc": hits / max(scored, 1.0)
            for k, (hits, scored) in enumerate(sums.view(-1, 2).tolist(), start=1)
        }
