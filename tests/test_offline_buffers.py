"""Episodes -> d3rlpy: action size, terminal vs timeout semantics, discount, mixing."""

from __future__ import annotations

import numpy as np
import pytest

from kalm.data.episodes import Episode, EpisodeDataset
from kalm.envs import get_spec
from kalm.offline.algos import build_algo_config
from kalm.offline.buffers import MixedSampler, TransitionTable, build_replay_buffer, relabel_rewards
from kalm.offline.config import TrainConfig
from kalm.offline.encoder import shared_encoder

SPEC = get_spec("clevr")


def embed(texts):
    """The real default encoder, loaded once per process."""
    return shared_encoder().encode(texts)


def _episode(length: int, terminated: bool, actions=None, start: float = 0.0, instruction: str = "Push the red ball behind the blue ball"):
    states = (start + np.arange(length + 1, dtype=np.float32)[:, None] * 0.01 + np.zeros((1, SPEC.state_dim), np.float32))
    return Episode(
        observations=states,
        actions=np.asarray(actions if actions is not None else [3] * length, dtype=np.int64),
        rewards=np.arange(length, dtype=np.float32) + 1.0,
        terminated=terminated,
        truncated=not terminated,
        instruction=instruction,
        task={"kind": "relation", "object": "red", "anchor": "blue", "direction": "behind"},
    )


def _dataset(*episodes):
    return EpisodeDataset(env="clevr", episodes=tuple(episodes), metadata={})


def test_action_size_comes_from_the_spec_not_the_data():
    buffer = build_replay_buffer(_dataset(_episode(4, True, actions=[0, 1, 2, 1])), SPEC, embed)
    assert buffer.dataset_info.action_size == SPEC.action_dim == 40


def test_terminated_episode_ends_with_a_terminal_transition():
    table = TransitionTable.from_replay_buffer(build_replay_buffer(_dataset(_episode(5, True)), SPEC, embed))
    assert len(table) == 5
    np.testing.assert_array_equal(table.terminals.ravel(), [0, 0, 0, 0, 1])
    np.testing.assert_array_equal(table.rewards.ravel(), [1, 2, 3, 4, 5])


def test_truncated_episode_keeps_every_transition_and_bootstraps_from_the_last_state():
    episode = _episode(5, False)
    table = TransitionTable.from_replay_buffer(build_replay_buffer(_dataset(episode), SPEC, embed))
    assert len(table) == 5
    assert not table.terminals.any()
    np.testing.assert_allclose(table.next_observations[-1, : SPEC.state_dim], episode.observations[-1])
    np.testing.assert_allclose(table.observations[-1, : SPEC.state_dim], episode.observations[-2])
    np.testing.assert_array_equal(table.rewards.ravel(), [1, 2, 3, 4, 5])


def test_observations_carry_the_instruction_embedding_on_every_state():
    episode = _episode(3, False, instruction="Place the red ball to the left of the blue ball")
    table = TransitionTable.from_replay_buffer(build_replay_buffer(_dataset(episode), SPEC, embed))
    expected = embed([episode.instruction])[0]
    assert table.observations.shape[1] == SPEC.state_dim + shared_encoder().dim
    np.testing.assert_allclose(table.observations[:, SPEC.state_dim :], np.tile(expected, (3, 1)))
    np.testing.assert_allclose(table.next_observations[:, SPEC.state_dim :], np.tile(expected, (3, 1)))


def test_batches_use_unit_intervals_so_the_configured_discount_applies():
    table = TransitionTable.from_replay_buffer(
        build_replay_buffer(_dataset(_episode(4, True), _episode(6, False)), SPEC, embed)
    )
    batch = MixedSampler(table, None, 64, 0.0).sample(np.random.default_rng(0))
    # d3rlpy discounts by gamma ** interval; the reference filled intervals with the
    # terminal flags, which made gamma 1 on every non-terminal step.
    np.testing.assert_array_equal(batch.intervals, np.ones((64, 1), np.float32))
    config = TrainConfig(algo="cql", gamma=0.9).for_action_space(True)
    assert build_algo_config(config, SPEC).gamma == 0.9


def test_mixed_batches_take_the_configured_share_from_imaginary_data():
    real = TransitionTable.from_replay_buffer(build_replay_buffer(_dataset(_episode(20, False)), SPEC, embed))
    fake = TransitionTable.from_replay_buffer(
        build_replay_buffer(_dataset(_episode(3, True, start=5.0)), SPEC, embed)
    )
    sampler = MixedSampler(real, fake, 40, 0.25)
    batch = sampler.sample(np.random.default_rng(1))
    from_fake = batch.observations[:, 0] >= 5.0
    assert (sampler.n_real, sampler.n_imaginary) == (30, 10)
    assert from_fake.sum() == 10


def test_per_source_mixing_gives_a_small_source_the_same_share_as_a_large_one():
    def table(episode):
        return TransitionTable.from_replay_buffer(build_replay_buffer(_dataset(episode), SPEC, embed))

    real = table(_episode(20, False))
    large, small = table(_episode(40, True, start=5.0)), table(_episode(2, True, start=9.0))
    rng = np.random.default_rng(0)
    split = MixedSampler(real, [large, small], 100, 0.5)
    pooled = MixedSampler(real, TransitionTable(*(np.concatenate([getattr(large, f), getattr(small, f)])
                                                  for f in TransitionTable.__dataclass_fields__)), 100, 0.5)
    for sampler, low, high in ((split, 0.5, 0.5), (pooled, 0.0, 0.15)):
        batches = [sampler.sample(rng).observations[:, 0] for _ in range(40)]
        assert all(len(b) == 100 and (b >= 5.0).sum() == 50 for b in batches)
        from_small = [(b >= 9.0).sum() / (b >= 5.0).sum() for b in batches]
        assert low <= min(from_small) and max(from_small) <= high
    odd = MixedSampler(real, [large, small, real], 100, 0.5)  # 50 slots for 3 sources: 17 / 17 / 16 in some order
    counts = [sorted([(b >= 9.0).sum(), ((b >= 5.0) & (b < 9.0)).sum()]) for b in
              (odd.sample(rng).observations[50:, 0] for _ in range(10))]
    assert all(c in ([16, 17], [17, 17]) for c in counts)


def test_imaginary_mix_must_be_known():
    with pytest.raises(ValueError, match="imaginary_mix"):
        TrainConfig(imaginary_mix="by_level")


def test_without_imaginary_data_the_whole_batch_is_real():
    real = TransitionTable.from_replay_buffer(build_replay_buffer(_dataset(_episode(4, True)), SPEC, embed))
    sampler = MixedSampler(real, None, 16, 0.5)
    assert (sampler.n_real, sampler.n_imaginary) == (16, 0)


def test_relabelled_sparse_reward_is_one_only_on_success():
    # red starts in front of blue and ends behind it: the last state satisfies the task.
    states = np.zeros((3, SPEC.state_dim), np.float32)
    states[:, 2:4] = [0.0, 0.0]
    states[:, 4:] = [[0.4, 0.4, -0.4, 0.4, 0.0, 0.5]] * 3
    states[:, 0:2] = [[0.0, -0.4], [0.3, 0.0], [0.0, 0.3]]
    episode = Episode(
        observations=states,
        actions=np.array([0, 1]),
        rewards=np.zeros(2, np.float32),
        terminated=True,
        truncated=False,
        instruction="x",
        task={"kind": "relation", "object": "red", "anchor": "blue", "direction": "behind"},
    )
    np.testing.assert_array_equal(relabel_rewards(SPEC, "sparse")(episode), [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown reward 'dense'"):
        relabel_rewards(SPEC, "dense")


def test_discrete_env_refuses_continuous_only_algorithms():
    with pytest.raises(ValueError, match="not available for discrete actions"):
        TrainConfig(algo="td3plusbc").for_action_space(True)
    assert TrainConfig(algo="iql").for_action_space(False).batch_size == 256
