"""Is an imagined CLEVR-Robot transition physically plausible?

An imagined rollout has no simulator behind it, so these checks read only the two
states and the push. Thresholds were calibrated on real transitions (random and expert
pushes, ball velocities carried over) so that real physics almost never trips them;
see ``tests/test_clevr_plausibility.py``.

- ``off_workbench``: a ball centre lies beyond where the walls let it be.
- ``too_far``: a ball moved farther in one push than the real physics ever moves one.
- ``moved_untouched``: a ball moved although neither the pusher's path nor the path of
  any ball that moved came near it (a chain of knocks is allowed).
- ``non_finite``: a coordinate is NaN or infinite.
"""

from __future__ import annotations

import numpy as np

from kalm.envs.clevr.env import BALL_RADIUS, PUSH_OFFSET, WORKBENCH_HIGH, WORKBENCH_LOW, decode_action

MAX_STEP_DISPLACEMENT = 0.5  # real pushes: median 0.17-0.20, max 0.45 (original data 0.449)
_WORKBENCH_SLACK = 0.01
_UNTOUCHED_MOTION = 0.06  # residual velocity from the previous push moves balls up to ~0.05
_CONTACT_SLACK = 0.04
_PUSHER_RADIUS = 0.05
_PUSHER_TRAVEL = 0.6  # the pusher keeps driving for 0.4 s: about 0.5 of travel

CHECKS = ("off_workbench", "too_far", "moved_untouched", "non_finite")


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each point to the segment a-b."""
    ab = b - a
    denom = float(ab @ ab)
    t = np.zeros(len(points)) if denom < 1e-12 else np.clip((points - a) @ ab / denom, 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def transition_violations(state: np.ndarray, action, next_state: np.ndarray) -> dict[str, bool]:
    """Which plausibility checks the transition ``state --action--> next_state`` fails."""
    state = np.asarray(state, dtype=np.float64).reshape(-1, 2)
    nxt = np.asarray(next_state, dtype=np.float64).reshape(-1, 2)
    if not (np.all(np.isfinite(state)) and np.all(np.isfinite(nxt))):
        return {"off_workbench": False, "too_far": False, "moved_untouched": False, "non_finite": True}
    off = bool(np.any(nxt < WORKBENCH_LOW - _WORKBENCH_SLACK) or np.any(nxt > WORKBENCH_HIGH + _WORKBENCH_SLACK))
    moved = np.linalg.norm(nxt - state, axis=1)
    too_far = bool(np.any(moved > MAX_STEP_DISPLACEMENT))

    pushed, direction = decode_action(int(action))
    unit = direction / np.linalg.norm(direction)
    pusher_start = state[pushed] - PUSH_OFFSET * direction
    pusher_end = pusher_start + _PUSHER_TRAVEL * unit
    reach = BALL_RADIUS + _PUSHER_RADIUS + _CONTACT_SLACK
    touched = _segment_distance(state, pusher_start, pusher_end) < reach
    touched[pushed] = True
    # Knocks propagate: a ball that was touched and moved can touch the balls near its path.
    for _ in range(len(state)):
        grew = False
        for i in np.flatnonzero(touched):
            near = _segment_distance(state, state[i], nxt[i]) < 2 * BALL_RADIUS + _CONTACT_SLACK
            new = near & ~touched
            if new.any():
                touched |= new
                grew = True
        if not grew:
            break
    untouched_moved = bool(np.any(moved[~touched] > _UNTOUCHED_MOTION))
    return {"off_workbench": off, "too_far": too_far, "moved_untouched": untouched_moved, "non_finite": False}
