"""The package's scripted policies as kalm experts.

``metaworld.policies.ENV_POLICY_MAP[name]().get_action(obs)`` solves each skill from the
goal-observable observation (the scripted policies read the goal from ``obs[36:39]``),
so the same policy also solves a relocated goal. A composition runs the policies of
its two stages in turn, each on the observation its own scene would give it:

- make-coffee: coffee-push's policy until the mug is in place, then coffee-button's
  with the button (second slot) as its object; on its way up the hand keeps nudging
  the mug further in (pushing the mug deeper first left the hand stuck under the
  machine: 2 of 5).
- locked-door-open: door-unlock's policy on the lock (second slot) until the lock is
  open, then the hand rises 0.2 and backs off 0.1 (door-open's policy, started from
  beside the lock, would press the door shut), then door-open's policy on the handle.
  The stage is read from the state where it can be; only "has the hand already backed
  off" is remembered, per episode (keyed by its start state).

For ``then_home`` the expert runs the skill's policy until the skill's success test
holds, then opens the gripper, lifts and moves the hand back to where the episode
started (a proportional controller, the package's ``move`` with the gain its policies
use); the phase is read from the state.

Diversity: with probability ``epsilon`` a step is a uniformly random action (the
collector's convention), and ``noise_std`` adds Gaussian noise to every expert action;
actions are clipped to [-1, 1].
"""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP
from metaworld.policies.policy import move

from kalm.envs.metaworld.env import ACTION_DIM
from kalm.envs.metaworld.tasks import (
    BUTTON_ABOVE_GOAL,
    BUTTON_TRAVEL,
    MUG_TOLERANCE,
    UNLOCKED_ANGLE,
    Skill,
    ThenHome,
    goal,
    hand,
    lock_angle,
    obj,
    obj2,
    skill_of,
)
from kalm.envs.spec import Task

_GAIN = 10.0  # the package policies' usual proportional gain
_LIFT_CLEARANCE = 0.02
_LIFT_RADIUS = 0.04
_BACK_OFF = np.array([0.0, -0.1, 0.2])
_BACKED_OFF = 0.03
_REMEMBERED_EPISODES = 256  # episodes an expert interleaves at most (lockstep batches are 64)


def home_action(state: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Open the gripper and go home, rising first when the hand is low and away from
    it (so it does not drag what it just moved)."""
    pos = hand(state)
    target = np.asarray(home, dtype=np.float64)
    if pos[2] < target[2] - _LIFT_CLEARANCE and np.linalg.norm(pos[:2] - target[:2]) > _LIFT_RADIUS:
        target = np.array([pos[0], pos[1], target[2]])
    return np.append(move(pos, to_xyz=target, p=_GAIN), -1.0)


class MetaWorldExpert:
    """``expert(obs, task, start) -> action`` (float32, shape (4,))."""

    def __init__(self, epsilon: float = 0.0, seed: int | None = None, noise_std: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if noise_std < 0.0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.epsilon = epsilon
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed)
        self._policies: dict[str, object] = {}
        # locked-door-open: per episode, where the hand backs off to (None once there)
        self._back_off: dict[bytes, np.ndarray | None] = {}

    def _policy(self, skill: str):
        if skill not in self._policies:
            self._policies[skill] = ENV_POLICY_MAP[f"{skill}-v3"]()
        return self._policies[skill]

    def _act(self, skill: str, obs: np.ndarray) -> np.ndarray:
        return np.asarray(self._policy(skill).get_action(obs), dtype=np.float64)

    def _make_coffee(self, obs: np.ndarray) -> np.ndarray:
        if np.linalg.norm(obj(obs) - goal(obs)) > MUG_TOLERANCE:
            return self._act("coffee-push", obs)
        button = obs.copy()
        button[4:7] = obj2(obs)
        button[36:39] = goal(obs) + BUTTON_ABOVE_GOAL + np.array([0.0, BUTTON_TRAVEL, 0.0])
        return self._act("coffee-button", button)

    def _locked_door_open(self, obs: np.ndarray, start: np.ndarray) -> np.ndarray:
        if lock_angle(obs) > UNLOCKED_ANGLE:
            lock = obs.copy()
            lock[4:7] = obj2(obs)
            return self._act("door-unlock", lock)
        episode = np.asarray(start, dtype=np.float32).tobytes()
        if episode not in self._back_off:
            if len(self._back_off) >= _REMEMBERED_EPISODES:
                self._back_off.pop(next(iter(self._back_off)))
            self._back_off[episode] = hand(obs) + _BACK_OFF
        target = self._back_off[episode]
        if target is not None and np.linalg.norm(hand(obs) - target) > _BACKED_OFF:
            return np.append(move(hand(obs), to_xyz=target, p=_GAIN), 1.0)
        self._back_off[episode] = None  # backed off: door-open's policy from here on
        return self._act("door-open", obs)

    def plan(self, obs: np.ndarray, task: Task, start: np.ndarray) -> np.ndarray:
        """The noiseless expert action."""
        obs = np.asarray(obs, dtype=np.float64)
        skill = skill_of(task)
        with warnings.catch_warnings():  # "Constant(s) may be too high": we clip below
            warnings.simplefilter("ignore", UserWarning)
            if isinstance(task, ThenHome) and Skill(skill).success(obs):
                return home_action(obs, hand(start))
            if skill == "make-coffee":
                return self._make_coffee(obs)
            if skill == "locked-door-open":
                return self._locked_door_open(obs, start)
            return self._act(skill, obs)

    def __call__(self, obs: np.ndarray, task: Task, start: np.ndarray) -> np.ndarray:
        if self.epsilon > 0 and self.rng.random() < self.epsilon:
            return self.rng.uniform(-1.0, 1.0, ACTION_DIM).astype(np.float32)
        action = self.plan(obs, task, start)
        if self.noise_std > 0:
            action = action + self.rng.normal(0.0, self.noise_std, ACTION_DIM)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def make_expert(env=None, epsilon: float = 0.0, seed: int | None = None, noise_std: float = 0.0) -> MetaWorldExpert:
    """The spec's ``make_expert``; the policies need only the observation, not ``env``."""
    return MetaWorldExpert(epsilon=epsilon, seed=seed, noise_std=noise_std)
