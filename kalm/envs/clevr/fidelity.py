"""How closely our physics reproduces transitions recorded in the original environment.

The reference file holds (obs, action, next_obs) from KALM's CLEVR-Robot. Observations
omit ball velocities, which carry over between pushes in both simulators, so two
replays are reported (kalm-reference §11):
- ``from_rest``: every transition replayed with the balls at rest at the recorded
  positions. Even the original code replays its own data this way with median 0.0197.
- ``first_steps``: the first push of each episode, which really did start at rest.
The error is the L2 norm over the 10-vector of ball centres.

The public from-rest set (``clevr_physics_public.npz``, §11.x) starts every push at rest,
so its next states are a deterministic function of start and push: a perfect copy of
the original scores 0 (:func:`replay_from_rest`). Its free pushes, where only the pushed
ball moves, give the original's push length per direction (:func:`free_push_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kalm.envs.clevr.env import PUSH_DIRECTIONS, CLEVRRobotEnv

# Median free-push length of the original environment (kalm-reference §11): axis
# directions, diagonals (whose control (0.8, 0.8) has norm 1.131, so they push harder).
ORIGINAL_FREE_PUSH = {"axis": 0.2504, "diagonal": 0.2766}


@dataclass(frozen=True)
class FidelityReport:
    transitions: int
    from_rest_median: float
    from_rest_p90: float
    from_rest_max: float
    first_steps_median: float
    first_steps_p90: float

    def table(self) -> str:
        return (
            "| replay | n | median | p90 | max |\n|---|---|---|---|---|\n"
            f"| every transition from rest | {self.transitions} | {self.from_rest_median:.4f} | "
            f"{self.from_rest_p90:.4f} | {self.from_rest_max:.4f} |\n"
            f"| first push of each episode | - | {self.first_steps_median:.4f} | {self.first_steps_p90:.4f} | - |"
        )


def replay_reference(path: str | Path) -> FidelityReport:
    """Replay the recorded transitions of a KALM-layout ``.npz`` and measure the error."""
    with np.load(path, allow_pickle=False) as data:
        obs, actions, next_obs, masks = (data[k] for k in ("observations", "actions", "next_observations", "masks"))
    env = CLEVRRobotEnv()
    errors, first = [], []
    for episode in range(obs.shape[0]):
        for t in np.flatnonzero(masks[episode]):
            env.set_state(obs[episode, t])
            env.push(int(actions[episode, t]))
            error = float(np.linalg.norm(env.get_state() - next_obs[episode, t]))
            errors.append(error)
            if t == 0:
                first.append(error)
    e, f = np.asarray(errors), np.asarray(first)
    return FidelityReport(
        transitions=len(e),
        from_rest_median=float(np.median(e)),
        from_rest_p90=float(np.percentile(e, 90)),
        from_rest_max=float(e.max()),
        first_steps_median=float(np.median(f)),
        first_steps_p90=float(np.percentile(f, 90)),
    )


def replay_from_rest(path: str | Path) -> dict[str, float]:
    """Replay the public from-rest pushes (``single_*`` arrays): the median, p90 and
    share below 1e-3 of the next-state error, overall and per start sampler."""
    with np.load(path, allow_pickle=False) as data:
        obs, actions, next_obs, kind = (data[k] for k in ("single_obs", "single_action", "single_next_obs",
                                                          "single_kind"))
    env = CLEVRRobotEnv()
    errors = np.empty(len(obs))
    for i, (start, action, target) in enumerate(zip(obs, actions, next_obs)):
        env.set_state(start)
        env.push(int(action))
        errors[i] = np.linalg.norm(env.get_state() - target)
    return {"pushes": len(errors), "median": float(np.median(errors)), "p90": float(np.percentile(errors, 90)),
            "exact": float(np.mean(errors < 1e-3)), "median_reset_starts": float(np.median(errors[kind == 0])),
            "median_clustered_starts": float(np.median(errors[kind == 1]))}


def free_push_lengths(path: str | Path) -> dict[str, tuple[float, float, int]]:
    """Per direction kind (axis / diagonal): the median length the pushed ball travels in
    the original and here, over the public from-rest pushes in which no other ball moved
    and the pushed ball ended clear of the walls."""
    with np.load(path, allow_pickle=False) as data:
        obs, actions, next_obs = (data[k] for k in ("single_obs", "single_action", "single_next_obs"))
    env = CLEVRRobotEnv()
    lengths: dict[str, list[tuple[float, float]]] = {"axis": [], "diagonal": []}
    for start, action, target in zip(obs, actions, next_obs):
        ball, direction = divmod(int(action), len(PUSH_DIRECTIONS))
        before, after = start.reshape(-1, 2), target.reshape(-1, 2)
        moved = np.linalg.norm(after - before, axis=1)
        clear = abs(after[ball, 0]) <= 0.4 and -0.1 <= after[ball, 1] <= 0.5
        if np.delete(moved, ball).max() > 1e-3 or not clear:
            continue
        env.set_state(start)
        env.push(int(action))
        ours = np.linalg.norm(env.get_state().reshape(-1, 2)[ball] - before[ball])
        lengths["axis" if direction < 4 else "diagonal"].append((float(moved[ball]), float(ours)))
    return {kind: (float(np.median([o for o, _ in pairs])), float(np.median([m for _, m in pairs])), len(pairs))
            for kind, pairs in lengths.items()}
