"""What grounding minimises, and how: the losses of a batch, the optimizer and its schedule."""

from __future__ import annotations

import math

import torch

from kalm.grounding.model import GroundedLM
from kalm.grounding.prompts import IGNORE_INDEX


class GroundingObjective(torch.nn.Module):
    """The losses of one batch; a module so DDP/DeepSpeed see every parameter used.

    state: MSE of the predicted change in units of the per-step change; action: CE
    (discrete) or MSE of normalised actions; done: BCE; text: CE on instruction
    tokens. The LM head runs only where text is supervised.
    """

    def __init__(self, model: GroundedLM):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m = self.model
        embeds = m.embed_sequence(batch["input_ids"], batch["states"], batch["actions"])
        hidden, _ = m(embeds, batch["attention_mask"], batch["position_ids"])
        losses: dict[str, torch.Tensor] = {}
        sm = batch["state_mask"]
        if sm.any():
            # One unit for every state target, the goal's too (its change from s_0 in
            # per-step units): measuring the goal in units of the state's spread instead
            # made the shared head emit two scales and halved the dynamics gain on
            # CLEVR-Robot. On Meta-World the goal's per-step units make its loss far
            # larger than the others (a separate goal head is the fix still to measure).
            target = (batch["state_targets"][sm] - batch["state_reference"][sm]) / m.io.delta_std
            losses["state"] = torch.nn.functional.mse_loss(m.predict_state_change(hidden[sm]), target)
        am = batch["action_mask"]
        if am.any():
            out = m.io.action_head(hidden[am].float())
            if m.config.discrete:
                losses["action"] = torch.nn.functional.cross_entropy(out, batch["action_targets"][am])
            else:
                target = (batch["action_targets"][am] - m.io.action_mean) / m.io.action_std
                losses["action"] = torch.nn.functional.mse_loss(out, target)
        dm = batch["done_mask"]
        if dm.any():
            losses["done"] = torch.nn.functional.binary_cross_entropy_with_logits(
                m.predict_done(hidden[dm]), batch["done_targets"][dm])
        tm = batch["token_targets"] != IGNORE_INDEX
        if tm.any():
            logits = m.token_logits(hidden[tm]).float()
            losses["text"] = torch.nn.functional.cross_entropy(logits, batch["token_targets"][tm])
        losses["total"] = sum(losses.values())
        return losses


def make_optimizer(model: GroundedLM, lr: float, io_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with one learning rate for the LLM's trainable weights and another for the
    new I/O layers, which start from scratch."""
    io = [p for p in model.io.parameters() if p.requires_grad]
    llm = [p for p in model.llm.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": llm, "lr": lr}, {"params": io, "lr": io_lr}], weight_decay=weight_decay)


def cosine_with_warmup(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
