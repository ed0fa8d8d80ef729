"""The grounded LLM as a policy: it picks every action itself in the real simulator.

The reference baseline that KALM is compared with. Each episode prefills the
generation prompt (instruction + the real start state) once, then alternates: read the
action at the current state's position, execute it in the simulator, feed the action
and the *real* next state back through the KV cache. Actions are greedy.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

from kalm.envs.spec import Instruction


class LLMPolicy:
    """An evaluation policy (``begin(env, instruction, start, rng) -> act``) backed by a
    grounded model."""

    name = "llm-policy"

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator):
        model, device = self.model, self.device
        prompt = model.build_generation_prompt([instruction.text], np.asarray(start, dtype=np.float32)[None])
        embeds = model.embed_sequence(prompt["input_ids"].to(device), prompt["states"].to(device),
                                      prompt["actions"].to(device))
        mask = prompt["attention_mask"].to(device)
        position = prompt["position_ids"][:, -1:].to(device)
        hidden, cache = model(embeds, mask, prompt["position_ids"].to(device), None, use_cache=True)
        state = {"hidden": hidden[:, -1], "cache": cache, "mask": mask, "position": position, "first": True}

        def feed(token_embeds: torch.Tensor) -> None:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
            state["position"] = state["position"] + 1
            hidden, state["cache"] = model(token_embeds, state["mask"], state["position"], state["cache"],
                                           use_cache=True)
            state["hidden"] = hidden[:, -1]

        def act(obs: np.ndarray):
            with torch.no_grad():
                if not state["first"]:
                    feed(model.embed_states(torch.as_tensor(np.asarray(obs, np.float32)[None], device=device)))
                state["first"] = False
                out = model.predict_action(state["hidden"])
                action = out.argmax(-1) if model.config.discrete else out
                feed(model.embed_actions(action))
            value = action[0].cpu().numpy()
            return int(value) if model.config.discrete else value.astype(np.float32)

        return act
