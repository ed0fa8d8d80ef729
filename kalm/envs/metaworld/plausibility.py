"""Is an imagined Meta-World transition physically plausible?

An imagined rollout has no simulator behind it, so these checks read only the two
39-d states. Thresholds were calibrated on real transitions so that real physics never
trips them: 10,758 over the MT10 tasks and 9,014 over KALM's 22 (the scripted expert
with epsilon 0, 0.1, 0.3 + noise 0.1, and fully random actions); see
``tests/test_metaworld.py``.

- ``non_finite``: a coordinate is NaN or infinite.
- ``off_workbench``: the hand is beyond the mocap limits (the package clips the hand
  target to x in [-0.5, 0.5], y in [0.4, 1.0], z in [0.05, 0.5]; real: x -0.27..0.30,
  y 0.35..0.89, z 0.046..0.42) or an object is off the table / below it / above reach.
- ``too_far``: the hand moved more than 0.045 in one step (mocap moves at most 0.01 per
  axis per step; real max 0.036, the hand slipping off door-unlock's lock) or an object
  more than 0.05 (real max 0.034; a puck falling from the top of the workspace reaches
  ~0.04 per 12.5 ms step).
- ``bad_gripper``: the opening is outside [0, 1] (the package normalises it there) or
  changed by more than 0.15 in one step (real max 0.078).
- ``bad_pose``: an object's quaternion is neither a unit quaternion nor all zeros (the
  package reports zeros for bodies it gives no orientation, and for an empty slot).
- The second object slot (the nail, the coffee button, the lock) is held to the same
  bounds and step limit as the first when it is not empty (all zeros).
- ``frame_mismatch``: the next state's previous-frame block (18:36) is not the current
  frame (0:18); the package stacks frames exactly.
- ``goal_moved``: the goal (36:39) changed; it is fixed for an episode.
"""

from __future__ import annotations

import numpy as np

# The mocap limits, except y: a door swinging open towards the robot pushes the hand
# past them (to y = 0.354 when opening the locked door, measured).
HAND_LOW = np.array([-0.5, 0.33, 0.05])
HAND_HIGH = np.array([0.5, 1.0, 0.5])
OBJECT_LOW = np.array([-0.6, 0.3, -0.01])
OBJECT_HIGH = np.array([0.6, 1.05, 0.5])
WORKBENCH_SLACK = 0.02
HAND_MAX_STEP = 0.045
OBJECT_MAX_STEP = 0.05
MAX_STEP_DISPLACEMENT = OBJECT_MAX_STEP
GRIPPER_MAX_STEP = 0.15
QUAT_TOLERANCE = 0.02
FRAME_TOLERANCE = 1e-4
GOAL_TOLERANCE = 1e-4

# What the physics copies from one observation into the next, as (destination, source,
# length[, only while empty]): the previous-frame block is the current frame, the goal is
# fixed for the episode, and an empty second object slot stays empty (a nail, button or
# lock in it moves). Imagination copies these rather than trusting the LLM
# (EnvSpec.carried_state), so frame_mismatch and goal_moved cannot fire on imagined
# states, nor an object appear in an empty slot.
CARRIED_STATE = ((18, 0, 18), (36, 36, 3), (11, 11, 7, True))

CHECKS = ("off_workbench", "too_far", "bad_gripper", "bad_pose", "frame_mismatch", "goal_moved", "non_finite")


def state_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Where each of the 39 coordinates can be (the spec's ``state_low`` / ``state_high``)."""
    quat_low, quat_high = -np.ones(4), np.ones(4)
    # The second object slot is empty (zeros) in most scenes: its box includes 0.
    second_low, second_high = np.minimum(OBJECT_LOW, 0.0), np.maximum(OBJECT_HIGH, 0.0)
    frame_low = np.concatenate([HAND_LOW, [0.0], OBJECT_LOW, quat_low, second_low, quat_low])
    frame_high = np.concatenate([HAND_HIGH, [1.0], OBJECT_HIGH, quat_high, second_high, quat_high])
    low = np.concatenate([frame_low, frame_low, OBJECT_LOW]).astype(np.float32)
    high = np.concatenate([frame_high, frame_high, OBJECT_HIGH]).astype(np.float32)
    return low, high


def _outside(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> bool:
    return bool(np.any(x < low - WORKBENCH_SLACK) or np.any(x > high + WORKBENCH_SLACK))


def transition_violations(state: np.ndarray, action, next_state: np.ndarray) -> dict[str, bool]:
    """Which plausibility checks the transition ``state --action--> next_state`` fails."""
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    n = np.asarray(next_state, dtype=np.float64).reshape(-1)
    result = dict.fromkeys(CHECKS, False)
    if s.shape != (39,) or n.shape != (39,):
        raise ValueError(f"Meta-World states have 39 numbers, got {s.shape} and {n.shape}")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(n))):
        result["non_finite"] = True
        return result
    objects = [slice(4, 11)] + ([slice(11, 18)] if np.any(np.abs(n[11:18]) > FRAME_TOLERANCE) else [])
    result["off_workbench"] = _outside(n[0:3], HAND_LOW, HAND_HIGH) or any(
        _outside(n[o][:3], OBJECT_LOW, OBJECT_HIGH) for o in objects)
    result["too_far"] = bool(np.linalg.norm(n[0:3] - s[0:3]) > HAND_MAX_STEP or any(
        np.linalg.norm(n[o][:3] - s[o][:3]) > OBJECT_MAX_STEP for o in objects))
    result["bad_gripper"] = bool(not 0.0 <= n[3] <= 1.0 or abs(n[3] - s[3]) > GRIPPER_MAX_STEP)
    quat_norms = [float(np.linalg.norm(n[o][3:])) for o in objects]
    result["bad_pose"] = any(abs(q - 1.0) > QUAT_TOLERANCE and q > QUAT_TOLERANCE for q in quat_norms)
    result["frame_mismatch"] = bool(np.max(np.abs(n[18:36] - s[0:18])) > FRAME_TOLERANCE)
    result["goal_moved"] = bool(np.max(np.abs(n[36:39] - s[36:39])) > GOAL_TOLERANCE)
    return result
