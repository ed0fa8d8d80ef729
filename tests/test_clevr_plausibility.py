"""The plausibility checks pass real physics and catch typical hallucinations."""

from __future__ import annotations

import numpy as np
import pytest

from kalm.envs import get_spec
from kalm.envs.clevr.env import CLEVRRobotEnv


def real_transitions(n_episodes=20, pushes=20):
    env, rng = CLEVRRobotEnv(), np.random.default_rng(1)
    for episode in range(n_episodes):
        state, _ = env.reset(seed=episode)
        for _ in range(pushes):
            action = int(rng.integers(40))
            nxt, *_ = env.step(action)
            yield state, action, nxt
            state = nxt


def test_real_physics_passes_every_check():
    check = get_spec("clevr").check_transition
    failures = [k for s, a, n in real_transitions() for k, bad in check(s, a, n).items() if bad]
    assert failures == []


@pytest.fixture()
def one_push():
    env = CLEVRRobotEnv()
    state = np.array([0.0, 0.2, -0.45, 0.55, 0.45, 0.55, -0.45, -0.15, 0.45, -0.15], dtype=np.float32)
    env.reset(seed=0, options={"state": state})
    nxt, *_ = env.step(0)  # red pushed right, nothing else touched
    return state, 0, nxt


def test_a_far_ball_that_moves_on_its_own_is_caught(one_push):
    state, action, nxt = one_push
    fake = nxt.copy()
    fake[8:10] += (-0.15, 0.1)  # cyan, far from red's path, drifts
    assert get_spec("clevr").check_transition(state, action, fake)["moved_untouched"]


def test_teleports_and_escapes_are_caught(one_push):
    state, action, nxt = one_push
    check = get_spec("clevr").check_transition
    teleport = nxt.copy()
    teleport[0] += 0.4  # red travels 0.65 in one push
    assert check(state, action, teleport)["too_far"]
    escaped = nxt.copy()
    escaped[1] = 0.8  # beyond the back wall
    assert check(state, action, escaped)["off_workbench"]
    broken = nxt.copy()
    broken[3] = np.nan
    assert check(state, action, broken)["non_finite"]
