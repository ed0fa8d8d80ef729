"""Continuous-action algorithms are chosen by the spec's action space and train.

No continuous environment is registered yet (Meta-World comes later), so the spec here
is CLEVR's with a Box action space: the offline code must only look at the spec.
"""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest

from kalm.data.episodes import Episode, EpisodeDataset
from kalm.envs import get_spec
from kalm.offline.algos import build_algo_config
from kalm.offline.buffers import EpisodeTable, MixedSampler, TrajectorySampler, TransitionTable, build_replay_buffer
from kalm.offline.config import TrainConfig
from kalm.offline.encoder import shared_encoder

SPEC = dataclasses.replace(get_spec("clevr"), name="box-clevr", action_space=gym.spaces.Box(-1.0, 1.0, (4,), np.float32))


def _dataset(rng):
    episodes = []
    for i in range(6):
        length = 5 + i
        episodes.append(
            Episode(
                observations=rng.normal(size=(length + 1, SPEC.state_dim)).astype(np.float32),
                actions=rng.uniform(-1, 1, size=(length, 4)).astype(np.float32),
                rewards=rng.normal(size=length).astype(np.float32),
                terminated=i % 2 == 0,
                truncated=i % 2 == 1,
                instruction=f"open drawer {i}",
                task={"kind": "line"},
            )
        )
    return EpisodeDataset(env=SPEC.name, episodes=tuple(episodes), metadata={})


@pytest.mark.parametrize("algo", ["bc", "cql", "td3plusbc", "iql", "awac"])
def test_continuous_algorithms_build_and_update(algo):
    rng = np.random.default_rng(0)
    buffer = build_replay_buffer(_dataset(rng), SPEC, shared_encoder().encode)
    assert buffer.dataset_info.action_size == 4
    table = TransitionTable.from_replay_buffer(buffer)
    config = TrainConfig(algo=algo, batch_size=16).for_action_space(SPEC.discrete)
    learner = build_algo_config(config, SPEC).create(device="cpu:0")
    learner.create_impl(table.observations.shape[1:], SPEC.action_dim)
    sampler = MixedSampler(table, None, 16, 0.0)
    for _ in range(3):
        losses = learner.update(sampler.sample(rng))
    assert all(np.isfinite(v) for v in losses.values())
    action = learner.predict(table.observations[:1])
    assert action.shape == (1, 4) and np.all(np.abs(action) <= 1.0)


def test_the_continuous_decision_transformer_learns_from_episode_slices():
    rng = np.random.default_rng(0)
    buffer = build_replay_buffer(_dataset(rng), SPEC, shared_encoder().encode, sequence=True)
    table = EpisodeTable(buffer.episodes)
    assert len(table) == sum(5 + i for i in range(6))  # one step per action: no padding step
    config = TrainConfig(algo="dt").for_action_space(SPEC.discrete)
    learner = build_algo_config(config, SPEC).create(device="cpu:0")
    learner.create_impl(table.observations.shape[1:], SPEC.action_dim)
    sampler = TrajectorySampler(table, [], 8, 0.0, config.dt_context)
    losses = [learner.update(sampler.sample(rng))["loss"] for _ in range(30)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    wrapper = learner.as_stateful_wrapper(target_return=1.0)
    action = wrapper.predict(table.observations[0], 0.0)
    assert action.shape == (4,) and np.all(np.abs(action) <= 1.0)


def test_trajectory_batches_keep_the_imaginary_share_and_follow_the_seed():
    rng = np.random.default_rng(1)
    real = EpisodeTable(build_replay_buffer(_dataset(rng), SPEC, shared_encoder().encode, sequence=True).episodes)
    fake = EpisodeTable(build_replay_buffer(_dataset(rng), SPEC, shared_encoder().encode, sequence=True).episodes)
    sampler = TrajectorySampler(real, [fake, fake], 10, 0.4, 3)
    assert (sampler.n_real, sampler.n_imaginary) == (6, 4)
    a, b = sampler.sample(np.random.default_rng(7)), sampler.sample(np.random.default_rng(7))
    assert a.observations.shape == (10, 3, real.observations.shape[1]) and np.array_equal(a.actions, b.actions)
