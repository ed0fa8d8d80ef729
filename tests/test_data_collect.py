"""Expert collection: valid, deterministic, resumable episodes that really solve their tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kalm.data.collect import CollectConfig, collect_expert, collect_range, collect_to_file, partial_dir
from kalm.data.episodes import DatasetError, load_episodes, save_episodes
from kalm.envs import get_spec

SPEC = get_spec("clevr")


@pytest.fixture(scope="module")
def small() -> list:
    return collect_expert(SPEC, episodes=6, seed=3, epsilon=0.0, reward="sparse", progress=False)


def test_collected_episodes_are_valid_and_solve_their_tasks(small, tmp_path: Path) -> None:
    tasks = SPEC.training_tasks()
    assert len(small) == 6 and small.metadata["source"] == "expert" and small.metadata["reward"] == "sparse"
    for i, ep in enumerate(small.episodes):
        task = SPEC.parse_task(ep.task)
        assert task == tasks[i % len(tasks)]
        assert SPEC.parse_instruction(ep.instruction) == task
        start = ep.observations[0]
        assert not task.success(start, start)
        assert ep.terminated == task.success(ep.observations[-1], start)
        assert ep.terminated or (ep.truncated and ep.length == SPEC.max_episode_steps)
        # Only the last state may satisfy the task: the episode stops there.
        assert not any(task.success(s, start) for s in ep.observations[1:-1])
        expected = [SPEC.rewards["sparse"](task, s, n, start) for s, n in zip(ep.observations[:-1], ep.observations[1:])]
        np.testing.assert_array_equal(ep.rewards, np.float32(expected))
        assert ep.actions.dtype == np.int64 and np.all((ep.actions >= 0) & (ep.actions < SPEC.action_dim))
    assert small.success_rate >= 5 / 6
    loaded = load_episodes(save_episodes(small, tmp_path / "small.h5"))
    assert [ep.length for ep in loaded.episodes] == [ep.length for ep in small.episodes]


def test_replaying_actions_reproduces_the_states(small) -> None:
    env = SPEC.make_env()
    ep = small.episodes[0]
    env.reset(options={"state": ep.observations[0]})
    for t, action in enumerate(ep.actions):
        obs, *_ = env.step(int(action))
        np.testing.assert_allclose(obs, ep.observations[t + 1], atol=1e-5)
    env.close()


def test_collection_is_deterministic_per_episode(small) -> None:
    config = CollectConfig(episodes=6, seed=3)
    again = collect_range(SPEC, config, 4, 6)
    for a, b in zip(again, small.episodes[4:]):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction
    other = collect_range(SPEC, CollectConfig(episodes=6, seed=4), 4, 5)[0]
    assert not np.array_equal(other.observations[0], small.episodes[4].observations[0])


def test_shaped_rewards_and_epsilon() -> None:
    data = collect_expert(SPEC, episodes=2, seed=0, epsilon=0.5, reward="shaped", progress=False)
    for ep in data.episodes:
        if ep.terminated:
            assert ep.rewards[-1] == 100.0
        assert np.any((ep.rewards != 0) & (ep.rewards != 100.0))
    assert data.metadata["epsilon"] == 0.5 and data.metadata["reward"] == "shaped"


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reward 'dense'"):
        collect_expert(SPEC, episodes=1, seed=0, epsilon=0.0, reward="dense", progress=False)
    with pytest.raises(ValueError, match="epsilon must be in"):
        CollectConfig(epsilon=1.5).check(SPEC)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        CollectConfig(episodes=0).check(SPEC)


def test_killed_collection_resumes_to_the_same_dataset(small, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "expert.h5"
    config = CollectConfig(episodes=6, seed=3, chunk_size=2)
    import kalm.data.collect as collect_module

    real = collect_module.collect_range
    calls = []

    def dies_on_third_chunk(spec, cfg, start, stop, progress=None):
        calls.append(start)
        if start == 4:
            raise KeyboardInterrupt("killed")
        return real(spec, cfg, start, stop, progress)

    monkeypatch.setattr(collect_module, "collect_range", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        collect_to_file(SPEC, config, out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in partial_dir(out).iterdir()) == ["config.json", "shard-00000.h5", "shard-00001.h5"]

    with pytest.raises(DatasetError, match="other settings"):
        collect_to_file(SPEC, CollectConfig(episodes=6, seed=4, chunk_size=2), out, progress=False)

    calls.clear()

    def counting(spec, cfg, start, stop, progress=None):
        calls.append(start)
        return real(spec, cfg, start, stop, progress)

    monkeypatch.setattr(collect_module, "collect_range", counting)
    resumed = collect_to_file(SPEC, config, out, progress=False)
    assert not partial_dir(out).exists()
    loaded = load_episodes(out)
    for a, b in zip(loaded.episodes, small.episodes):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction
    assert calls == [4], "only the missing chunk is collected again"
    assert len(resumed) == 6 and loaded.metadata["seed"] == 3


def test_worker_processes_write_the_one_process_file(small, tmp_path: Path) -> None:
    config = CollectConfig(episodes=6, seed=3, chunk_size=2)
    collect_to_file(SPEC, config, tmp_path / "one.h5", progress=False)
    collect_to_file(SPEC, config, tmp_path / "two.h5", progress=False, workers=2)
    one, two = load_episodes(tmp_path / "one.h5"), load_episodes(tmp_path / "two.h5")
    assert len(two) == 6 and not partial_dir(tmp_path / "two.h5").exists()
    for a, b in zip(one.episodes, two.episodes, strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction
    assert {k: v for k, v in one.metadata.items() if k != "created_utc"} == {
        k: v for k, v in two.metadata.items() if k != "created_utc"}
