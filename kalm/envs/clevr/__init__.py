"""CLEVR-Robot: five balls on a table, 40 discrete pushes, instructions about their arrangement."""

from __future__ import annotations

import numpy as np

from kalm.envs.clevr import language, tasks
from kalm.envs.clevr.env import (
    MAX_EPISODE_STEPS,
    N_ACTIONS,
    STATE_DIM,
    WORKBENCH_HIGH,
    WORKBENCH_LOW,
    CLEVRRobotEnv,
)
from kalm.envs.clevr.expert import make_expert
from kalm.envs.clevr.plausibility import MAX_STEP_DISPLACEMENT, transition_violations
from kalm.envs.clevr.render import render_top_down
from kalm.envs.clevr.rewards import REWARDS

GYM_ID = "kalm/CLEVRRobot-v0"


def make_env(**kwargs) -> CLEVRRobotEnv:
    import gymnasium as gym

    return gym.make(GYM_ID, **kwargs)


def make_spec():
    import gymnasium as gym

    from kalm.envs.spec import EnvSpec

    return EnvSpec(
        name="clevr",
        gym_id=GYM_ID,
        state_dim=STATE_DIM,
        action_space=gym.spaces.Discrete(N_ACTIONS),
        max_episode_steps=MAX_EPISODE_STEPS,
        state_low=np.tile(WORKBENCH_LOW, STATE_DIM // 2).astype(np.float32),
        state_high=np.tile(WORKBENCH_HIGH, STATE_DIM // 2).astype(np.float32),
        max_step_displacement=MAX_STEP_DISPLACEMENT,
        levels=language.LEVELS,
        training_instruction=language.training_instruction,
        parse_task=tasks.parse_task,
        parse_instruction=language.parse_instruction,
        training_tasks=tasks.relation_goals,
        make_expert=make_expert,
        make_env=make_env,
        check_transition=transition_violations,
        rewards=REWARDS,
        render_state=render_top_down,
        task_horizon=lambda task: tasks.task_horizon(task, MAX_EPISODE_STEPS),
        grounding_phrasings=language.grounding_phrasings,
    )


__all__ = ["GYM_ID", "CLEVRRobotEnv", "language", "make_env", "make_spec", "tasks"]
