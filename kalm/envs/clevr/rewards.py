"""Per-step rewards for CLEVR-Robot transitions, computed from states and the task.

``shaped`` reproduces the reward of the original KALM real dataset (verified there to
6e-7): ten times the decrease of the distance from the object to a point 0.195 beyond
the anchor in the goal direction, replaced by +100 on the step that succeeds. Task
kinds the original never shaped use ten times the decrease of the task's cost.
``sparse`` is 1 on the step that succeeds and 0 elsewhere.
"""

from __future__ import annotations

import numpy as np

from kalm.envs.clevr.tasks import DIRECTIONS, RELATION_DISTANCE, Relation, ball
from kalm.envs.spec import Task

SUCCESS_BONUS = 100.0
SHAPING_SCALE = 10.0


def _relation_distance(task: Relation, state: np.ndarray) -> float:
    target = ball(state, task.anchor) + (RELATION_DISTANCE / 2) * np.asarray(DIRECTIONS[task.direction])
    return float(np.linalg.norm(ball(state, task.object) - target))


def shaped_reward(task: Task, state: np.ndarray, next_state: np.ndarray, start: np.ndarray) -> float:
    if task.success(next_state, start):
        return SUCCESS_BONUS
    if isinstance(task, Relation):
        return SHAPING_SCALE * (_relation_distance(task, state) - _relation_distance(task, next_state))
    return SHAPING_SCALE * (task.cost(state, start) - task.cost(next_state, start))


def sparse_reward(task: Task, state: np.ndarray, next_state: np.ndarray, start: np.ndarray) -> float:
    return 1.0 if task.success(next_state, start) else 0.0


REWARDS = {"shaped": shaped_reward, "sparse": sparse_reward}
