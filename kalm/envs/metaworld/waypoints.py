"""Meta-World rollouts as waypoints every ``k`` steps, and back to per-step transitions.

A small LLM writing 150 steps of 39-d states one at a time drifts off the physics long
before it reaches a goal; ``k`` times fewer states are ``k`` times fewer chances to
drift, and a grounding window of 16 waypoints covers a whole episode instead of its
first 16 steps.

- **Encoding** keeps the states at steps ``0, k, 2k, ...`` and the last one. A
  waypoint's action is what moves the arm from one waypoint to the next: the first
  three numbers sum the real actions' hand moves over ``k`` (an action moves the hand's
  mocap target by ``0.01`` per unit, so ``k`` steps of this action move the target as
  far as the real ones did), the gripper effort is the real efforts' mean.
- **Decoding** spreads each waypoint step over ``k`` steps: every step repeats the
  waypoint action; positions move linearly, quaternions by normalised linear
  interpolation, the previous-frame block is the previous decoded frame (as the
  package stacks them) and the goal stays.

Why the hand's motion does not decide the actions: the hand trails its mocap target
(a second-order lag: at a steady speed the target leads by five to six steps of motion,
fitted with R² 0.96 on expert data). Actions taken from the hand's own path replayed
14 % of 44 expert episodes to success at ``k = 1`` even when inverted through that fit,
and 2 % without it; the waypoint action replays 98 % at ``k = 1`` and 88 % at
``k = 10`` (66 episodes over the 22 tasks, with :meth:`Waypoints.settle`). So the
waypoint action carries the target's motion and the states carry the hand's.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from kalm.envs.metaworld.plausibility import CARRIED_STATE

HAND = slice(0, 3)
GRIPPER_EFFORT = 3
FRAME = 18  # the current frame is state[:18], the previous frame state[18:36]
QUATERNIONS = (slice(7, 11), slice(14, 18))
GOAL = slice(36, 39)


def _nlerp(q0: np.ndarray, q1: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Normalised linear interpolation of two quaternions; an all-zero end (an object
    the package gives no orientation, or an empty slot) keeps the other end."""
    if not np.any(q0) or not np.any(q1):
        return np.repeat((q1 if np.any(q1) else q0)[None], len(fractions), axis=0)
    # q and -q are one rotation: take the short way, signed so the segment ends on q1
    sign = -1.0 if np.dot(q0, q1) < 0 else 1.0
    q = (1 - fractions)[:, None] * sign * q0 + fractions[:, None] * q1
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@dataclass(frozen=True)
class Waypoints:
    """Meta-World's time scale for grounding and imagination (``EnvSpec.waypoints``)."""

    every: int = 10

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"waypoints must be at least one step apart, got every={self.every}")

    @property
    def carried_state(self) -> tuple[tuple, ...]:
        """The blocks imagination copies from one *waypoint* to the next: not the
        previous frame (a waypoint's previous frame is one step before it, not one
        waypoint; decoding rebuilds it)."""
        return tuple(block for block in CARRIED_STATE if block[0] != FRAME)

    def encode(self, observations: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(T+1, 39)`` states and ``(T, 4)`` actions -> the waypoint states at steps
        ``0, k, 2k, ...`` and ``T``, and each waypoint step's action."""
        observations, actions = np.asarray(observations), np.asarray(actions)
        steps = len(actions)
        marks = [*range(0, steps, self.every), steps]
        out = []
        for a, b in pairwise(marks):
            action = actions[a:b].mean(0)
            # a short last segment moves the target as far as it did, over k steps
            action[HAND] = np.clip(actions[a:b, HAND], -1.0, 1.0).sum(0) / self.every
            out.append(action)
        waypoint_actions = np.stack(out).astype(actions.dtype) if out else actions[:0].copy()
        return observations[marks].copy(), waypoint_actions

    def decode(self, observations: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Waypoint states ``(W+1, 39)`` and actions ``(W, 4)`` -> ``(kW+1, 39)`` per-step
        states and ``(kW, 4)`` per-step actions; every ``k``-th state's current frame
        and goal are the waypoint's."""
        observations = np.asarray(observations, dtype=np.float64)
        actions = np.clip(np.asarray(actions, dtype=np.float32).reshape(len(observations) - 1, -1), -1.0, 1.0)
        k = self.every
        fractions = np.arange(1, k + 1, dtype=np.float64) / k
        frames = [observations[:1, :FRAME]]
        for a, b in pairwise(observations):
            segment = a[None, :FRAME] + fractions[:, None] * (b - a)[None, :FRAME]
            for block in QUATERNIONS:
                segment[:, block] = _nlerp(a[block], b[block], fractions)
            frames.append(segment)
        frames = np.concatenate(frames)
        states = np.empty((len(frames), observations.shape[1]), dtype=np.float64)
        states[:, :FRAME] = frames
        states[0, FRAME : 2 * FRAME] = observations[0, FRAME : 2 * FRAME]
        states[1:, FRAME : 2 * FRAME] = frames[:-1]
        states[:, GOAL] = observations[0, GOAL]
        return states.astype(np.float32), np.repeat(actions, k, axis=0)

    def settle(self, actions: np.ndarray) -> np.ndarray:
        """``actions`` and then ``k`` steps that hold the target still with the last
        gripper effort: the hand, trailing its target, arrives where the actions sent
        it. Replays of decoded actions end with them."""
        actions = np.asarray(actions, dtype=np.float32)
        if not len(actions):
            return actions
        hold = np.zeros_like(actions[-1])
        hold[GRIPPER_EFFORT] = actions[-1, GRIPPER_EFFORT]
        return np.concatenate([actions, np.repeat(hold[None], self.every, axis=0)])
