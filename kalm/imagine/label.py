"""Turn generated trajectories into labelled episodes.

The task's success predicate is evaluated on the imagined states, as the reference
implementation did: the rollout ends at the first state where it holds, which is
terminal and rewarded. Rewards use the same named reward function as the real data,
so real and imagined episodes mean the same thing to the offline learner.
"""

from __future__ import annotations

import numpy as np

from kalm.data.episodes import Episode
from kalm.envs.spec import EnvSpec, Task


def first_success(task: Task, states: np.ndarray) -> int | None:
    """Index of the first state after ``s_0`` where the task holds, or None."""
    for t in range(1, len(states)):
        if task.success(states[t], states[0]):
            return t
    return None


def label_rollout(
    spec: EnvSpec, task: Task, instruction: str, states: np.ndarray, actions: np.ndarray, reward: str
) -> tuple[Episode, bool]:
    """An episode cut at the first success, with rewards from ``spec.rewards[reward]``;
    returns it and whether it succeeded."""
    success_at = first_success(task, states)
    end = success_at if success_at is not None else len(actions)
    states, actions = states[: end + 1], actions[:end]
    reward_fn = spec.rewards[reward]
    rewards = np.array([reward_fn(task, states[t], states[t + 1], states[0]) for t in range(end)], dtype=np.float32)
    succeeded = success_at is not None
    episode = Episode(
        observations=states,
        actions=actions,
        rewards=rewards,
        terminated=succeeded,
        truncated=not succeeded,
        instruction=instruction,
        task=task.to_json(),
    )
    return episode, succeeded
