"""Minari export and import: Minari itself reads what kalm writes, and kalm reads it back unchanged."""

from __future__ import annotations

import dataclasses
import json
import os

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer
from minari.dataset._storages.hdf5_storage import HDF5Storage
from typer.testing import CliRunner

from kalm.cli import app
from kalm.data.collect import collect_expert
from kalm.data.episodes import DatasetError, EpisodeDataset, load_episodes, save_episodes
from kalm.data.minari import export_minari, import_minari
from kalm.envs import get_spec

SPEC = get_spec("clevr")
ID = "kalm/clevr-test-v0"


@pytest.fixture(scope="module")
def clevr() -> EpisodeDataset:
    """Real expert episodes, one of them relabelled as truncated so both flags travel."""
    data = collect_expert(SPEC, episodes=5, seed=1, epsilon=0.0, reward="sparse", progress=False)
    episodes = list(data.episodes)
    episodes[1] = dataclasses.replace(episodes[1], terminated=False, truncated=True)
    return dataclasses.replace(data, episodes=tuple(episodes))


@pytest.fixture(autouse=True)
def no_default_root(monkeypatch, tmp_path):
    """Nothing here may touch ~/.minari: an export or import that ignored ``root``
    would find no dataset (or write into an empty scratch directory)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "not-the-root"))


def assert_same_episodes(got: EpisodeDataset, expected: EpisodeDataset) -> None:
    assert got.env == expected.env and len(got) == len(expected)
    for a, b in zip(got.episodes, expected.episodes):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.actions.dtype == b.actions.dtype
        np.testing.assert_array_equal(a.rewards, b.rewards)
        assert (a.terminated, a.truncated) == (b.terminated, b.truncated)
        assert a.instruction == b.instruction and a.task == b.task


def assert_minari_matches(loaded: minari.MinariDataset, source: EpisodeDataset) -> None:
    assert loaded.total_episodes == len(source) and loaded.total_steps == source.n_transitions
    for data, ep in zip(loaded.iterate_episodes(), source.episodes):
        np.testing.assert_array_equal(data.observations, ep.observations)
        np.testing.assert_array_equal(data.actions, ep.actions)
        assert data.actions.dtype == ep.actions.dtype
        np.testing.assert_array_equal(data.rewards, ep.rewards)
        flags = np.zeros(ep.length, dtype=bool)
        np.testing.assert_array_equal(data.terminations, np.r_[flags[:-1], ep.terminated])
        np.testing.assert_array_equal(data.truncations, np.r_[flags[:-1], ep.truncated])


def test_minari_reads_the_export_and_recovers_the_env(clevr, tmp_path, monkeypatch) -> None:
    export_minari(clevr, ID, root=tmp_path, author="kalm tests")
    assert os.environ["MINARI_DATASETS_PATH"] == str(tmp_path / "not-the-root")  # restored
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    loaded = minari.load_dataset(ID)
    assert_minari_matches(loaded, clevr)
    assert loaded.action_space == SPEC.action_space and loaded.observation_space.shape == (SPEC.state_dim,)
    assert loaded.storage.metadata["author"] == {"kalm tests"}
    fields = list(loaded.storage.get_episode_metadata(loaded.episode_indices))
    assert [f["instruction"] for f in fields] == [ep.instruction for ep in clevr.episodes]
    # The recovered env replays an episode from its stored start state and task.
    env = loaded.recover_environment()
    assert env.spec.id == SPEC.gym_id
    episode = loaded[2]
    obs, _ = env.reset(options={"task": json.loads(fields[2]["task"]), "state": episode.observations[0]})
    for action in episode.actions:
        obs, _, terminated, _, _ = env.step(int(action))
    env.close()
    np.testing.assert_allclose(obs, episode.observations[-1], atol=1e-5)
    assert terminated == clevr.episodes[2].terminated


def test_round_trip_keeps_every_episode_and_the_metadata(clevr, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MINARI_DATASETS_PATH")
    export_minari(clevr, ID, root=tmp_path)
    back = import_minari(ID, root=tmp_path)
    assert "MINARI_DATASETS_PATH" not in os.environ  # unset again, as it was
    assert_same_episodes(back, clevr)
    assert back.metadata == clevr.metadata
    assert_same_episodes(load_episodes(save_episodes(back, tmp_path / "back.h5")), clevr)


def test_continuous_actions_round_trip(tmp_path, monkeypatch) -> None:
    pytest.importorskip("metaworld")
    spec = get_spec("metaworld")
    data = collect_expert(spec, episodes=2, seed=0, epsilon=0.0, reward="sparse", progress=False)
    export_minari(data, "kalm/metaworld-test-v0", root=tmp_path)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    loaded = minari.load_dataset("kalm/metaworld-test-v0")
    assert loaded.action_space == spec.action_space and loaded.env_spec.id == spec.gym_id
    assert_minari_matches(loaded, data)
    assert_same_episodes(import_minari("kalm/metaworld-test-v0", root=tmp_path), data)


def test_an_existing_id_is_refused_unless_overwrite(clevr, tmp_path) -> None:
    export_minari(clevr, ID, root=tmp_path)
    with pytest.raises(FileExistsError, match=f"{ID}' already exists"):
        export_minari(clevr, ID, root=tmp_path)
    assert len(import_minari(ID, root=tmp_path)) == len(clevr)
    fewer = dataclasses.replace(clevr, episodes=clevr.episodes[:2])
    export_minari(fewer, ID, root=tmp_path, overwrite=True)
    assert_same_episodes(import_minari(ID, root=tmp_path), fewer)


def test_a_failed_export_leaves_no_dataset(clevr, tmp_path, monkeypatch) -> None:
    def disk_full(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(HDF5Storage, "update_episode_metadata", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_minari(clevr, ID, root=tmp_path)
    assert not (tmp_path / ID).exists()


def test_unknown_and_malformed_ids_are_refused(clevr, tmp_path) -> None:
    with pytest.raises(DatasetError, match="no Minari dataset 'kalm/missing-v0'"):
        import_minari("kalm/missing-v0", root=tmp_path)
    with pytest.raises(DatasetError, match=r"no Minari dataset 'kalm/missing-v0'.*not a directory"):
        import_minari("kalm/missing-v0", root=tmp_path / "absent")
    for bad in ("kalm/no-version", "../escape-v0"):
        with pytest.raises(ValueError, match="malformed Minari dataset id"):
            export_minari(clevr, bad, root=tmp_path)
        with pytest.raises(ValueError, match="malformed Minari dataset id"):
            import_minari(bad, root=tmp_path)


def test_a_dataset_not_written_by_kalm_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    rng = np.random.default_rng(0)
    buffer = EpisodeBuffer(observations=rng.normal(size=(4, SPEC.state_dim)).astype(np.float32),
                           actions=np.array([1, 2, 3]), rewards=np.zeros(3, np.float32),
                           terminations=np.array([False, False, True]), truncations=np.zeros(3, bool))
    with pytest.warns(UserWarning):
        minari.create_dataset_from_buffers("other/plain-v0", [buffer], action_space=SPEC.action_space,
                                           observation_space=gym.spaces.Box(-1, 1, (SPEC.state_dim,), np.float32))
    with pytest.raises(DatasetError, match=r"'other/plain-v0' was not written by kalm.*lacks the 'kalm' entry"):
        import_minari("other/plain-v0", root=tmp_path)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda group: group.attrs.__delitem__("instruction"), "no kalm episode metadata 'instruction'"),
        (lambda group: group.attrs.__delitem__("task"), "no kalm episode metadata 'task'"),
        (lambda group: group.attrs.__setitem__("task", '{"kind": "fly"}'), ".*unknown kind 'fly'"),
        (lambda group: group["terminations"].__setitem__(0, True), "terminates or truncates before"),
        (lambda group: group["actions"].__setitem__(0, 40), "actions .* outside the action space"),
    ],
)
def test_damaged_episodes_are_refused(clevr, tmp_path, tamper, message) -> None:
    export_minari(clevr, ID, root=tmp_path)
    target = next(i for i, ep in enumerate(clevr.episodes) if ep.length > 1)  # a step before the last exists
    with h5py.File(tmp_path / ID / "data" / "main_data.hdf5", "a") as f:
        tamper(f[f"episode_{target}"])
    with pytest.raises(DatasetError, match=f"Minari dataset '{ID}', episode {target}: {message}"):
        import_minari(ID, root=tmp_path)


def test_cli_export_and_import(clevr, tmp_path) -> None:
    source = save_episodes(clevr, tmp_path / "expert.h5")
    root = tmp_path / "minari"
    export = ["data", "export-minari", str(source), "--id", ID, "--root", str(root)]
    result = CliRunner().invoke(app, export)
    assert result.exit_code == 0, result.output
    assert f"Minari dataset {ID}" in result.output and "5 episodes" in result.output

    again = CliRunner().invoke(app, export)
    assert again.exit_code == 2 and "already exists" in again.output and len(again.output.strip().splitlines()) == 1
    assert CliRunner().invoke(app, [*export, "--overwrite"]).exit_code == 0

    out = tmp_path / "back.h5"
    result = CliRunner().invoke(app, ["data", "import-minari", ID, "--out", str(out), "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert_same_episodes(load_episodes(out), clevr)

    missing = CliRunner().invoke(app, ["data", "import-minari", "kalm/missing-v0", "--out", str(out), "--root", str(root)])
    assert missing.exit_code == 2 and "no Minari dataset 'kalm/missing-v0'" in missing.output
