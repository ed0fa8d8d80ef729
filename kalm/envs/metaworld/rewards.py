"""Per-step rewards for Meta-World transitions, computed from states and the task.

``sparse`` is 1 on a step whose next state satisfies the task, else 0. ``shaped`` is
10 on that step (KALM's Meta-World success bonus) and otherwise ten times the decrease
of a potential: the task's cost (distance to its success threshold) plus, while an
object skill is unsolved, half the hand-to-object distance, so reaching the object is
rewarded before the object moves. This is a potential-based shaping of our own over
the state, not the package's reward (which reads simulator internals the state lacks).
"""

from __future__ import annotations

import numpy as np

from kalm.envs.metaworld.tasks import TCP_OFFSET, Skill, hand, obj, skill_of
from kalm.envs.spec import Task

SUCCESS_BONUS = 10.0
SHAPING_SCALE = 10.0
REACH_WEIGHT = 0.5


def potential(task: Task, state: np.ndarray, start: np.ndarray) -> float:
    cost = task.cost(state, start)
    skill = skill_of(task)
    if skill != "reach" and not Skill(skill).success(state):
        cost += REACH_WEIGHT * float(np.linalg.norm(hand(state) + TCP_OFFSET - obj(state)))
    return float(cost)


def shaped_reward(task: Task, state: np.ndarray, next_state: np.ndarray, start: np.ndarray) -> float:
    if task.success(next_state, start):
        return SUCCESS_BONUS
    return SHAPING_SCALE * (potential(task, state, start) - potential(task, next_state, start))


def sparse_reward(task: Task, state: np.ndarray, next_state: np.ndarray, start: np.ndarray) -> float:
    return 1.0 if task.success(next_state, start) else 0.0


REWARDS = {"shaped": shaped_reward, "sparse": sparse_reward}
