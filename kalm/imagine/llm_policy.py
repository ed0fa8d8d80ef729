"""The grounded LLM as a policy: it picks every action itself in the real simulator.

The reference baseline that KALM is compared with. Each episode prefills the
generation prompt (instruction + the real start state) once, then alternates: read the
action at the current state's position, execute it in the simulator, feed the action
and the *real* next state back through the KV cache. Actions are greedy or, given a
``temperature``, drawn from the action head's distribution (discrete actions) with the
episode's own generator, as ``kalm run`` has the offline-RL policies act: a greedy push
into a wall sees the same state again and repeats until the horizon. A model grounded
on waypoints (``EnvSpec.waypoints``) reads a state and picks an action every ``every``
steps and holds that action in between, as its waypoint actions were made.

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

    def __init__(self, model, batch_size: int = 64, temperature: float = 0.0, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        if temperature > 0 and not model.config.discrete:
            raise ValueError("the LLM policy samples discrete actions only; continuous actions are greedy "
                             "(temperature 0)")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.batch_size, self.temperature, self.every = batch_size, temperature, every
        if temperature > 0:
            self.name = f"llm-policy@T{temperature:g}"

    def begin_batch(self, instructions: Sequence[Instruction], starts: np.ndarray,
                    rngs: Sequence[np.random.Generator] | None = None) -> Callable[..., np.ndarray]:
        """Prefill one prompt per episode; the returned function maps the batch's
        current observations ``(B, obs_dim)`` to its actions (``(B,)`` discrete,
        ``(B, action_dim)`` continuous). Rows whose episode has ended may be fed any
        observation: their actions are not used (every row keeps its place in the KV
        cache). Sampled actions are drawn for the running rows, each from its
        episode's generator in ``rngs``."""
        if self.temperature > 0 and rngs is None:
            raise ValueError("a sampling LLM policy needs one generator per episode")
        model, device = self.model, self.device
        with torch.no_grad():
            # Every row prefills its own prompt, as ``begin`` does alone (no shared prefill
            # between rows with the same instruction), so a batch computes what single
            # episodes compute.
            seq, hidden = prefill(model, [ins.text for ins in instructions], np.asarray(starts, dtype=np.float32),
                                  GenerationConfig(share_prefill=False), device)
        step, chosen = 0, None

        @torch.no_grad()
        def act(observations: np.ndarray, running: np.ndarray | None = None) -> np.ndarray:
            nonlocal step, hidden, chosen
            step += 1
            if (step - 1) % self.every:
                return chosen
            if step > 1:
                states = torch.as_tensor(np.asarray(observations, dtype=np.float32), device=device)
                hidden = seq.feed(model.embed_states(states), use_cache=True)
            out = model.predict_action(hidden)
            action = out.argmax(-1) if model.config.discrete else out
            if self.temperature > 0:
                action = self._sample(out, action, running, rngs)
            seq.feed(model.embed_actions(action), use_cache=True)
            values = action.cpu().numpy()
            chosen = values if model.config.discrete else values.astype(np.float32)
            return chosen

        return act

    def _sample(self, logits: torch.Tensor, greedy: torch.Tensor, running: np.ndarray | None,
                rngs: Sequence[np.random.Generator]) -> torch.Tensor:
        """The running rows' actions drawn from ``softmax(logits / temperature)``, as
        :class:`kalm.evaluation.policies.TrainedPolicy` draws them."""
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1).numpy().astype(np.float64)
        action = greedy.clone()
        for i in np.flatnonzero(running) if running is not None else range(len(rngs)):
            action[i] = int(rngs[i].choice(probs.shape[1], p=probs[i] / probs[i].sum()))
        return action

    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator):
        act_batch = self.begin_batch([instruction], np.asarray(start, dtype=np.float32)[None], [rng])

        def act(obs: np.ndarray):
            value = act_batch(np.asarray(obs, dtype=np.float32)[None])[0]
            return int(value) if self.model.config.discrete else value

        return act
