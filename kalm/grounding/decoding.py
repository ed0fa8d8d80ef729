"""Plain greedy decoding with a grounded model, for measuring it: instruction text
(explanations) and rollouts. Imagination's batched, sampled generator is
:mod:`kalm.imagine.generate`; these loops favour being easy to check.
"""

from __future__ import annotations

import numpy as np
import torch

from kalm.grounding.prompts import collate


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def greedy_text(model, examples, max_new_tokens: int) -> list[str]:
    """Greedy continuation of left-padded prompts with a KV cache; placeholder tokens
    are never emitted."""
    device = next(model.parameters()).device
    b = to_device(collate(examples, model.pad_token_id, left_pad=True), device)
    hidden, cache = model(model.embed_sequence(b["input_ids"], b["states"], b["actions"]), b["attention_mask"],
                          b["position_ids"], use_cache=True)
    mask, pos = b["attention_mask"], b["position_ids"][:, -1:]
    eos = model.prompts.eos_token_id
    banned = [model.state_token_id, model.action_token_id]
    finished = torch.zeros(len(examples), dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in examples]
    for _ in range(max_new_tokens):
        logits = model.token_logits(hidden[:, -1]).float()
        logits[:, banned] = -torch.inf
        token = logits.argmax(-1)
        for i in torch.nonzero(~finished).flatten().tolist():
            if int(token[i]) != eos:
                out[i].append(int(token[i]))
        finished |= token == eos
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        hidden, cache = model(model.llm.get_input_embeddings()(token[:, None]), mask, pos, past_key_values=cache,
                              use_cache=True)
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]


@torch.no_grad()
def rollout(model, instructions: list[str], initial_states: np.ndarray, max_steps: int,
            done_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Greedy rollouts; returns the states ``(B, max_steps+1, state_dim)`` and each
    rollout's length (steps taken before done, or ``max_steps``)."""
    device = next(model.parameters()).device
    b = to_device(model.build_generation_prompt(instructions, initial_states), device)
    hidden, cache = model(model.embed_sequence(b["input_ids"], b["states"], b["actions"]), b["attention_mask"],
                          b["position_ids"], use_cache=True)
    mask, pos = b["attention_mask"], b["position_ids"][:, -1:]
    state = torch.as_tensor(np.asarray(initial_states, np.float32), device=device)
    n = state.shape[0]
    states = [state]
    lengths = torch.full((n,), max_steps, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    def advance(embeds):
        nonlocal mask, pos
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos + 1
        return model(embeds, mask, pos, past_key_values=cache, use_cache=True)

    for t in range(max_steps):
        h = hidden[:, -1]  # at s_t: done?, then a_t
        if t > 0:
            stop = (torch.sigmoid(model.predict_done(h)) > done_threshold) & ~done
            lengths[stop] = t
            done |= stop
            if bool(done.all()):
                break
        logits = model.predict_action(h)
        action = logits.argmax(-1) if model.config.discrete else logits
        hidden, cache = advance(model.embed_actions(action))  # at a_t: s_{t+1}
        state = torch.where(done[:, None], state, model.predict_state(hidden[:, -1], state))
        states.append(state)
        hidden, cache = advance(model.embed_states(state))
    traj = torch.stack(states, 1).cpu().numpy()
    if traj.shape[1] < max_steps + 1:
        pad = np.repeat(traj[:, -1:], max_steps + 1 - traj.shape[1], axis=1)
        traj = np.concatenate([traj, pad], 1)
    return traj, lengths.cpu().numpy()
