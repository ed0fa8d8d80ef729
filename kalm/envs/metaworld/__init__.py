"""Meta-World (metaworld 3.x): KALM's task split on a 7-DoF Sawyer arm, continuous actions.

Needs the optional ``metaworld`` package (``pip install 'kalm[metaworld]'``); importing
this package without it raises an ImportError that names the extra. Tasks, levels and
choices are documented in :mod:`~kalm.envs.metaworld.tasks` and :mod:`~kalm.envs.metaworld.env`.
"""

from __future__ import annotations

import numpy as np

from kalm.envs.metaworld import language, tasks
from kalm.envs.metaworld.env import ACTION_DIM, MAX_EPISODE_STEPS, SKILL_HORIZON, STATE_DIM, MetaWorldEnv
from kalm.envs.metaworld.expert import make_expert
from kalm.envs.metaworld.plausibility import (
    CARRIED_STATE,
    MAX_STEP_DISPLACEMENT,
    state_bounds,
    transition_violations,
)
from kalm.envs.metaworld.render import render_schematic
from kalm.envs.metaworld.rewards import REWARDS
from kalm.envs.metaworld.waypoints import Waypoints

GYM_ID = "kalm/MetaWorld-v0"  # registered in kalm/envs/__init__.py


def make_env(**kwargs) -> MetaWorldEnv:
    import gymnasium as gym

    return gym.make(GYM_ID, **kwargs)


def make_spec():
    import gymnasium as gym

    from kalm.envs.spec import EnvSpec

    low, high = state_bounds()
    return EnvSpec(
        name="metaworld",
        gym_id=GYM_ID,
        state_dim=STATE_DIM,
        action_space=gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32),
        max_episode_steps=MAX_EPISODE_STEPS,
        state_low=low,
        state_high=high,
        max_step_displacement=MAX_STEP_DISPLACEMENT,
        levels=language.LEVELS,
        training_instruction=language.training_instruction,
        parse_task=tasks.parse_task,
        parse_instruction=language.parse_instruction,
        training_tasks=tasks.training_tasks,
        make_expert=make_expert,
        make_env=make_env,
        check_transition=transition_violations,
        rewards=REWARDS,
        render_state=render_schematic,
        task_horizon=lambda task: tasks.task_horizon(task, SKILL_HORIZON),
        grounding_phrasings=language.grounding_phrasings,
        carried_state=CARRIED_STATE,
        waypoints=Waypoints(),
        scene_goals=tasks.scene_goals,
    )


__all__ = ["GYM_ID", "MetaWorldEnv", "language", "make_env", "make_spec", "tasks"]
