"""A plain MLP dynamics model: the measuring stick for the grounded LLM's dynamics, and
the world model of the imagination ablation without an LLM.

The LLM predicts the next state through a 135M-parameter backbone; if a small MLP
trained on the same training transitions predicts it as well, dynamics is not where the
LLM adds anything. Both are scored by the median per-transition L2 error on the same
held-out transitions (:func:`held_out_transitions`). The same model, saved as
safetensors, imagines the next states of :mod:`kalm.imagine.without_llm`.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kalm.files import write_atomic

HELD_OUT_TRANSITIONS = 2000  # held-out transitions scored (a seeded subset when there are more)


def held_out_transitions(episodes: list, max_transitions: int, seed: int) -> list[tuple]:
    """``(episode, t)`` pairs, a seeded subset of at most ``max_transitions``."""
    pairs = [(e, t) for e in episodes for t in range(e.length)]
    if len(pairs) > max_transitions:
        keep = np.random.default_rng(seed).choice(len(pairs), max_transitions, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    return pairs


def transition_arrays(pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States, actions and next states of ``(episode, t)`` pairs (any episode type with
    ``observations`` and ``actions``)."""
    states = np.stack([e.observations[t] for e, t in pairs]).astype(np.float32)
    nexts = np.stack([e.observations[t + 1] for e, t in pairs]).astype(np.float32)
    actions = np.stack([np.asarray(e.actions[t]) for e, t in pairs])
    return states, actions, nexts


class MLPDynamics(nn.Module):
    """``(s, a) -> s'`` as ``s + MLP(s, a) * delta_scale``, with its input statistics.

    Discrete actions enter one-hot. ``delta_scale`` is the root-mean-square per-step
    change of each coordinate, the unit the residual is predicted in (as the grounded
    LLM's state head does) and the noise unit of the imagination robustness filter.
    """

    def __init__(self, state_dim: int, action_dim: int, discrete: bool, hidden: int = 256):
        super().__init__()
        self.state_dim, self.action_dim, self.discrete, self.hidden = state_dim, action_dim, discrete, hidden
        n_in = state_dim + action_dim
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, state_dim))
        self.register_buffer("input_mean", torch.zeros(n_in))
        self.register_buffer("input_std", torch.ones(n_in))
        self.register_buffer("delta_scale", torch.ones(state_dim))

    def inputs(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        states = np.asarray(states, dtype=np.float32)
        if self.discrete:
            actions = np.eye(self.action_dim, dtype=np.float32)[np.asarray(actions, dtype=np.int64).reshape(-1)]
        return np.concatenate([states, np.asarray(actions, dtype=np.float32).reshape(len(states), -1)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised change, from raw ``state ⊕ action`` rows."""
        return self.net((x - self.input_mean) / self.input_std)

    @torch.no_grad()
    def predict(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Next states for a batch of states and actions."""
        x = torch.from_numpy(self.inputs(states, actions))
        return (np.asarray(states, dtype=np.float32) + (self(x) * self.delta_scale).numpy()).astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Weights, statistics and shapes in one safetensors file, written atomically."""
        from safetensors.torch import save

        meta = {"state_dim": str(self.state_dim), "action_dim": str(self.action_dim),
                "discrete": str(int(self.discrete)), "hidden": str(self.hidden)}
        data = save({k: v.contiguous() for k, v in self.state_dict().items()}, metadata=meta)
        return write_atomic(path, lambda f: f.write(data))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MLPDynamics:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MLP dynamics model not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:  # noqa: BLE001 (safetensors raises its own error type for a damaged header)
            raise ValueError(f"{path}: not an MLP dynamics model written by kalm ({exc})") from None
        try:
            model = cls(int(meta["state_dim"]), int(meta["action_dim"]), bool(int(meta["discrete"])),
                        int(meta["hidden"]))
            model.load_state_dict(tensors)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{path}: not an MLP dynamics model written by kalm ({exc})") from None
        return model.eval()


def fit_mlp_dynamics(states: np.ndarray, actions: np.ndarray, next_states: np.ndarray, action_dim: int,
                     discrete: bool, steps: int, seed: int, hidden: int = 256,
                     batch_size: int = 256) -> tuple[MLPDynamics, dict]:
    """Train an :class:`MLPDynamics` for up to ``steps`` Adam steps; returns it with
    ``best_step`` and ``seconds``.

    A tenth of the transitions picks the best step (checked every 100): on CLEVR-Robot's
    few thousand transitions the MLP overfits within a few thousand steps, and a stick
    that overfits would flatter the LLM. Steps, not a wall-time budget, so a run gives
    the same model on any machine (its wall time is reported beside it).
    """
    torch.manual_seed(seed)
    model = MLPDynamics(states.shape[1], action_dim, discrete, hidden)
    x = model.inputs(states, actions)
    deltas = (np.asarray(next_states, np.float32) - np.asarray(states, np.float32)).astype(np.float64)
    model.input_mean.copy_(torch.from_numpy(x.mean(0)))
    model.input_std.copy_(torch.from_numpy(np.maximum(x.std(0), 1e-3)))
    model.delta_scale.copy_(torch.from_numpy(np.maximum(np.sqrt((deltas**2).mean(0)), 1e-3).astype(np.float32)))
    inputs = torch.from_numpy(x)
    targets = torch.from_numpy(deltas.astype(np.float32)) / model.delta_scale
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    check, fit = order[: max(1, len(order) // 10)], order[max(1, len(order) // 10) :]
    optimizer = torch.optim.Adam(model.net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    started, best = time.time(), (float("inf"), 0, None)
    for step in range(1, steps + 1):
        batch = fit[torch.randint(0, len(fit), (batch_size,), generator=generator)]
        loss = nn.functional.mse_loss(model(inputs[batch]), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            with torch.no_grad():
                error = float(nn.functional.mse_loss(model(inputs[check]), targets[check]))
            if error < best[0]:
                best = (error, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model.eval(), {"best_step": best[1], "seconds": round(time.time() - started, 1)}


def mlp_dynamics_baseline(train: list, held_out: list[tuple], action_dim: int, discrete: bool,
                          steps: int, seed: int, hidden: int = 256, batch_size: int = 256) -> dict:
    """Train an :class:`MLPDynamics` on the transitions of ``train`` and score it on the
    ``held_out`` ``(episode, t)`` pairs by the median per-transition L2 error."""
    s, a, n = transition_arrays([(e, t) for e in train for t in range(e.length)])
    model, info = fit_mlp_dynamics(s, a, n, action_dim, discrete, steps, seed, hidden, batch_size)
    vs, va, vn = transition_arrays(held_out)
    error = np.linalg.norm(model.predict(vs, va) - vn, axis=1)
    return {"mlp_dynamics_median_l2": float(np.median(error)), "mlp_dynamics_best_step": info["best_step"],
            "mlp_dynamics_seconds": info["seconds"]}
