"""The grounded LLM as a policy: it picks every action itself in the real simulator.

The reference baseline that KALM is compared with. Each episode prefills the
generation prompt (instruction + the real start state) once, then alternates: read the
action at the current state's position, execute it in the simulator, feed the action
and the *real* next state back through the KV cache. Actions are greedy.

Episodes run in lockstep batches (:meth:`LLMPolicy.begin_batch`, driven by
:func:`kalm.evaluation.evaluate.evaluate`): one forward pass per token serves every
episode of the batch, the way :mod:`kalm.imagine.generate` serves imagined rollouts.
One episode at a time, the pipeline's 32 LLM-policy episodes took 111 s of its 28
minutes on 2 CPU cores; in batches of 64 it now runs 192 in 42 s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from kalm.envs.spec import Instruction
from kalm.imagine.generate import GenerationConfig, prefill


class LLMPolicy:
    """An evaluation policy backed by a grounded model: ``begin`` for one episode,
    ``begin_batch`` for up to ``batch_size`` episodes stepped together."""

    name = "llm-policy"

    def __init__(self, model, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.batch_size = batch_size

    def begin_batch(self, instructions: Sequence[Instruction], starts: np.ndarray,
                    rngs: Sequence[np.random.Generator] | None = None) -> Callable[..., np.ndarray]:
        """Prefill one prompt per episode; the returned function maps the batch's
        current observations ``(B, obs_dim)`` to its actions (``(B,)`` discrete,
        ``(B, action_dim)`` continuous). Rows whose episode has ended may be fed any
        observation: their actions are not used. Greedy, so ``rngs`` and the running
        mask are not needed (every row keeps its place in the KV cache)."""
        model, device = self.model, self.device
        with torch.no_grad():
            # Every row prefills its own prompt, as ``begin`` does alone (no shared prefill
            # between rows with the same instruction), so a batch computes what single
            # episodes compute.
            seq, hidden = prefill(model, [ins.text for ins in instructions], np.asarray(starts, dtype=np.float32),
                                  GenerationConfig(share_prefill=False), device)
        first = True

        @torch.no_grad()
        def act(observations: np.ndarray, running: np.ndarray | None = None) -> np.ndarray:
            nonlocal first, hidden
            if not first:
                states = torch.as_tensor(np.asarray(observations, dtype=np.float32), device=device)
                hidden = seq.feed(model.embed_states(states), use_cache=True)
            first = False
            out = model.predict_action(hidden)
            action = out.argmax(-1) if model.config.discrete else out
            seq.feed(model.embed_actions(action), use_cache=True)
            values = action.cpu().numpy()
            return values if model.config.discrete else values.astype(np.float32)

        return act

    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator):
        act_batch = self.begin_batch([instruction], np.asarray(start, dtype=np.float32)[None])

        def act(obs: np.ndarray):
            value = act_batch(np.asarray(obs, dtype=np.float32)[None])[0]
            return int(value) if self.model.config.discrete else value

        return act
