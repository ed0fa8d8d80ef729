"""How closely our physics reproduces transitions recorded in the original environment.

The reference file holds (obs, action, next_obs) from KALM's CLEVR-Robot. Observations
omit ball velocities, which carry over between pushes in both simulators, so two
replays are reported (kalm-reference §11):
- ``from_rest``: every transition replayed with the balls at rest at the recorded
  positions. Even the original code replays its own data this way with median 0.0197.
- ``first_steps``: the first push of each episode, which really did start at rest.
The error is the L2 norm over the 10-vector of ball centres.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kalm.envs.clevr.env import CLEVRRobotEnv


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
