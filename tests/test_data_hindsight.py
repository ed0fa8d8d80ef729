"""Hindsight-labelled grounding data: labels are the task predicates, one per episode,
deterministic per seed, resumable, and drawn from the training tasks only."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

from kalm.data.collect import collect_range, collect_to_file, partial_dir
from kalm.data.episodes import load_episodes
from kalm.data.hindsight import HindsightConfig, LabelVocabulary, hindsight_labels
from kalm.envs import get_spec
from kalm.envs.spec import goal_key

SPEC = get_spec("clevr")
CONFIG = HindsightConfig(episodes=12, seed=5, expert_share=0.25, chunk_size=4)


@pytest.fixture(scope="module")
def episodes():
    return collect_range(SPEC, CONFIG, 0, CONFIG.episodes)


def _newly_true(state, start):
    """Every training task, by its own predicate, that holds now and did not at the start."""
    return {goal_key(t) for t in SPEC.training_tasks() if t.success(state, start) and not t.success(start, start)}


def test_each_episode_achieved_exactly_its_label_and_nothing_before(episodes) -> None:
    for ep in episodes:
        task = SPEC.parse_task(ep.task)
        start = ep.observations[0]
        assert _newly_true(ep.observations[-1], start) == {goal_key(task)}
        for state in ep.observations[1:-1]:
            assert _newly_true(state, start) == set(), "the episode stops at the first achievement"
        assert len(hindsight_labels(SPEC, ep.observations)) == 1
        assert ep.terminated and not ep.truncated
        assert ep.rewards[-1] == 1.0 and not ep.rewards[:-1].any()


def test_labels_are_training_goals_phrased_with_training_wordings(episodes) -> None:
    training = {goal_key(t) for t in SPEC.training_tasks()}
    for ep in episodes:
        task = SPEC.parse_task(ep.task)
        assert goal_key(task) in training
        train_phrasings, _ = SPEC.grounding_phrasings(task)
        assert ep.instruction in train_phrasings
        read_back = SPEC.parse_instruction(ep.instruction)
        assert read_back is not None and goal_key(read_back) == goal_key(task)


def test_a_trajectory_with_two_new_relations_is_not_determined() -> None:
    vocabulary = LabelVocabulary(SPEC.training_tasks())
    rng = np.random.default_rng(0)
    env = SPEC.make_env()
    try:
        for _ in range(200):
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            start = np.asarray(obs, np.float32)
            obs, *_ = env.step(int(rng.integers(SPEC.action_dim)))
            achieved = vocabulary.achieved(np.asarray(obs, np.float32), start)
            if len(achieved) >= 2:
                break
        else:
            pytest.fail("no push in 200 made two relations true")
    finally:
        env.close()
    assert len(hindsight_labels(SPEC, np.stack([start, np.asarray(obs, np.float32)]))) == len(achieved)
    assert len({goal_key(t) for t in achieved}) == len(achieved), "one label per goal, not per name"


def test_episode_i_depends_only_on_seed_and_index(episodes) -> None:
    again = collect_range(SPEC, CONFIG, 7, 10)
    for a, b in zip(again, episodes[7:10]):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        assert (a.instruction, a.task) == (b.instruction, b.task)
    other = collect_range(SPEC, HindsightConfig(episodes=12, seed=6), 7, 8)[0]
    assert not np.array_equal(other.observations[0], episodes[7].observations[0])


@dataclass(frozen=True)
class _KilledAtEpisode8(HindsightConfig):
    """The same collection as its fields describe, killed when it reaches episode 8."""

    def make_episode(self, spec, env, index):
        if index == 8:
            raise KeyboardInterrupt("killed")
        return super().make_episode(spec, env, index)


def test_killed_hindsight_collection_resumes_to_the_same_file(episodes, tmp_path: Path) -> None:
    out = tmp_path / "hindsight.h5"
    with pytest.raises(KeyboardInterrupt):
        collect_to_file(SPEC, _KilledAtEpisode8(**asdict(CONFIG)), out, progress=False)
    assert not out.exists()
    assert sorted(p.name for p in partial_dir(out).glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]
    collect_to_file(SPEC, CONFIG, out, progress=False)
    assert not partial_dir(out).exists()
    loaded = load_episodes(out, SPEC)
    assert loaded.metadata["source"] == "hindsight" and len(loaded) == CONFIG.episodes
    for a, b in zip(loaded.episodes, episodes):
        np.testing.assert_array_equal(a.observations, b.observations)
        assert a.instruction == b.instruction


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="expert_share"):
        HindsightConfig(expert_share=1.5).check(SPEC)
    with pytest.raises(ValueError, match="unknown reward"):
        HindsightConfig(reward="dense").check(SPEC)
    with pytest.raises(ValueError, match="max_steps"):
        HindsightConfig(max_steps=0).check(SPEC)


def test_gives_up_with_a_clear_message_when_nothing_can_be_achieved() -> None:
    hopeless = HindsightConfig(episodes=1, max_steps=1, expert_share=0.0, max_tries=1)
    env = SPEC.make_env()
    try:
        with pytest.raises(ValueError, match="achieved exactly one training goal"):
            for index in range(50):  # one try per episode: some single random push achieves nothing
                hopeless.make_episode(SPEC, env, index)
    finally:
        env.close()


def test_cli_writes_a_hindsight_file_and_names_bad_settings(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kalm.cli import app

    out = tmp_path / "h.h5"
    result = CliRunner().invoke(app, ["data", "hindsight", "--episodes", "6", "--chunk-size", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "task kinds: relation 6" in result.output and len(load_episodes(out, SPEC)) == 6
    result = CliRunner().invoke(app, ["data", "hindsight", "--max-steps", "0", "--out", str(tmp_path / "x.h5")])
    assert result.exit_code != 0 and "max_steps must be >= 1" in result.output
