"""The package's scripted MT10 policies as kalm experts.

``metaworld.policies.ENV_POLICY_MAP[name]().get_action(obs)`` solves each skill from the
goal-observable observation (the scripted policies read the goal from ``obs[36:39]``),
so the same policy also solves a relocated goal. For ``then_home`` the expert runs the
skill's policy until the skill's success test holds, then opens the gripper, lifts
and moves the hand back to where the episode started (a proportional controller, the
package's ``move`` with the gain its policies use); the phase is read from the state,
so the expert stays a function of ``(obs, task, start)``.

Diversity: with probability ``epsilon`` a step is a uniformly random action (the
collector's convention), and ``noise_std`` adds Gaussian noise to every expert action;
actions are clipped to [-1, 1].
"""

from __future__ import annotations

import warnings

import numpy as np
from metaworld.policies import ENV_POLICY_MAP
from metaworld.policies.policy import move

from kalm.envs.metaworld.env import ACTION_DIM, package_name
from kalm.envs.metaworld.tasks import Skill, ThenHome, hand, skill_of
from kalm.envs.spec import Task

_GAIN = 10.0  # the package policies' usual proportional gain
_LIFT_CLEARANCE = 0.02
_LIFT_RADIUS = 0.04


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

    def _policy(self, skill: str):
        if skill not in self._policies:
            self._policies[skill] = ENV_POLICY_MAP[package_name(skill)]()
        return self._policies[skill]

    def plan(self, obs: np.ndarray, task: Task, start: np.ndarray) -> np.ndarray:
        """The noiseless expert action."""
        obs = np.asarray(obs, dtype=np.float64)
        skill = skill_of(task)
        with warnings.catch_warnings():  # "Constant(s) may be too high": we clip below
            warnings.simplefilter("ignore", UserWarning)
            if isinstance(task, ThenHome) and Skill(skill).success(obs):
                return home_action(obs, hand(start))
            return np.asarray(self._policy(skill).get_action(obs), dtype=np.float64)

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
