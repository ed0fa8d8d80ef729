"""A plain MLP dynamics model: the measuring stick for the grounded LLM's dynamics.

The LLM predicts the next state through a 135M-parameter backbone; if a small MLP
trained on the same training transitions predicts it as well, dynamics is not where the
LLM adds anything. Both are scored by the median per-transition L2 error on the same
held-out transitions (:func:`held_out_transitions`).
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from kalm.grounding.data import GroundingEpisode

HELD_OUT_TRANSITIONS = 2000  # held-out transitions scored (a seeded subset when there are more)


def held_out_transitions(episodes: list[GroundingEpisode], max_transitions: int, seed: int) -> list[tuple]:
    """``(episode, t)`` pairs, a seeded subset of at most ``max_transitions``."""
    pairs = [(e, t) for e in episodes for t in range(e.length)]
    if len(pairs) > max_transitions:
        keep = np.random.default_rng(seed).choice(len(pairs), max_transitions, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    return pairs


def _arrays(pairs, action_dim: int, discrete: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    states = np.stack([e.observations[t] for e, t in pairs]).astype(np.float32)
    nexts = np.stack([e.observations[t + 1] for e, t in pairs]).astype(np.float32)
    if discrete:
        actions = np.eye(action_dim, dtype=np.float32)[[int(e.actions[t]) for e, t in pairs]]
    else:
        actions = np.stack([e.actions[t] for e, t in pairs]).astype(np.float32)
    return states, actions, nexts


def mlp_dynamics_baseline(train: list[GroundingEpisode], held_out: list[tuple], action_dim: int, discrete: bool,
                          steps: int, seed: int, hidden: int = 256, batch_size: int = 256) -> dict:
    """Train an MLP ``(s, a) -> s' - s`` on the transitions of ``train`` for up to
    ``steps`` Adam steps, and score it on the ``held_out`` ``(episode, t)`` pairs.

    A tenth of the training transitions picks the best step (checked every 100): on
    CLEVR-Robot's few thousand transitions the MLP overfits within a few thousand steps,
    and a stick that overfits would flatter the LLM. Steps, not a wall-time budget, so
    a run gives the same numbers on any machine (its wall time is reported beside them).
    """
    torch.manual_seed(seed)
    s, a, n = _arrays([(e, t) for e in train for t in range(e.length)], action_dim, discrete)
    x = np.concatenate([s, a], 1)
    x_mean, x_std = x.mean(0), np.maximum(x.std(0), 1e-3)
    d_std = np.maximum((n - s).std(0), 1e-3)
    inputs, targets = torch.from_numpy((x - x_mean) / x_std), torch.from_numpy((n - s) / d_std)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    check, fit = order[: max(1, len(order) // 10)], order[max(1, len(order) // 10) :]
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.SiLU(), torch.nn.Linear(hidden, s.shape[1]))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    started, best = time.time(), (float("inf"), 0, None)
    for step in range(1, steps + 1):
        batch = fit[torch.randint(0, len(fit), (batch_size,), generator=generator)]
        loss = torch.nn.functional.mse_loss(net(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                error = float(torch.nn.functional.mse_loss(net(inputs[check]), targets[check]))
            if error < best[0]:
                best = (error, step, copy.deepcopy(net.state_dict()))
    net.load_state_dict(best[2])
    vs, va, vn = _arrays(held_out, action_dim, discrete)
    with torch.no_grad():
        pred = vs + net(torch.from_numpy((np.concatenate([vs, va], 1) - x_mean) / x_std)).numpy() * d_std
    return {"mlp_dynamics_median_l2": float(np.median(np.linalg.norm(pred - vn, axis=1))),
            "mlp_dynamics_best_step": best[1], "mlp_dynamics_seconds": round(time.time() - started, 1)}
