"""The episode file format: round trips, and every kind of damage refused by name."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from kalm.data import episodes as episodes_module
from kalm.data.episodes import DatasetError, Episode, EpisodeDataset, load_episodes, save_episodes
from kalm.envs import get_spec
from kalm.envs.spec import TaskSpecError

CLEVR = get_spec("clevr")
TASK = {"kind": "relation", "object": "red", "anchor": "blue", "direction": "left"}


def clevr_episode(length: int, rng: np.random.Generator, terminated: bool = False) -> Episode:
    return Episode(
        observations=rng.uniform(-0.4, 0.5, size=(length + 1, CLEVR.state_dim)),
        actions=rng.integers(0, CLEVR.action_dim, size=length),
        rewards=rng.normal(size=length),
        terminated=terminated,
        truncated=not terminated,
        instruction="Push the red ball to the left of the blue ball — ünïcode",
        task=TASK,
    )


def clevr_dataset(n: int = 4, seed: int = 0) -> EpisodeDataset:
    rng = np.random.default_rng(seed)
    eps = tuple(clevr_episode(int(rng.integers(1, 9)), rng, terminated=bool(i % 2)) for i in range(n))
    return EpisodeDataset(env="clevr", episodes=eps, metadata={"source": "test", "seed": seed, "nested": {"a": [1, 2]}})


def assert_same(a: EpisodeDataset, b: EpisodeDataset) -> None:
    assert a.env == b.env and a.metadata == b.metadata and len(a) == len(b)
    for x, y in zip(a.episodes, b.episodes):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.rewards, y.rewards)
        assert x.actions.dtype == y.actions.dtype
        assert (x.terminated, x.truncated, x.instruction, x.task) == (y.terminated, y.truncated, y.instruction, y.task)


def test_discrete_round_trip(tmp_path: Path) -> None:
    data = clevr_dataset()
    path = save_episodes(data, tmp_path / "sub" / "d.h5")
    loaded = load_episodes(path)
    assert_same(data, loaded)
    ep = loaded.episodes[0]
    assert ep.observations.dtype == np.float32 and ep.actions.dtype == np.int64 and ep.rewards.dtype == np.float32
    assert ep.length == ep.observations.shape[0] - 1
    assert not ep.observations.flags.writeable
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 1
        assert f["episode_lengths"][()].tolist() == [e.length for e in data.episodes]


def continuous_spec():
    """A real (small) EnvSpec with a Box action space, for the continuous code path."""

    def parse(task):
        if task.get("kind") != "reach":
            raise TaskSpecError(f"task.kind: unknown kind {task.get('kind')!r}")
        return task

    return replace(CLEVR, name="toy-continuous", state_dim=3, action_space=gym.spaces.Box(-1.0, 1.0, (2,)),
                   parse_task=parse)


def test_continuous_round_trip(tmp_path: Path) -> None:
    spec = continuous_spec()
    rng = np.random.default_rng(1)
    eps = tuple(
        Episode(rng.normal(size=(t + 1, 3)), rng.uniform(-1, 1, size=(t, 2)), rng.normal(size=t), False, True,
                "reach", {"kind": "reach"})
        for t in (1, 5, 3)
    )
    data = EpisodeDataset("toy-continuous", eps, {"source": "synthetic"})
    path = save_episodes(data, tmp_path / "c.h5")
    loaded = load_episodes(path, spec)
    assert_same(data, loaded)
    assert loaded.episodes[1].actions.shape == (5, 2) and loaded.episodes[1].actions.dtype == np.float32
    with h5py.File(path, "r+") as f:
        f["actions"][0] = [1.5, 0.0]
    with pytest.raises(DatasetError, match=r"'actions'.*step 0.*outside"):
        load_episodes(path, spec)
    with pytest.raises(DatasetError, match="loaded for 'clevr'"):
        load_episodes(path, CLEVR)


def test_episode_checks_its_shapes() -> None:
    obs, act, rew = np.zeros((4, 10)), np.zeros(3, dtype=int), np.zeros(3)
    Episode(obs, act, rew, False, True, "x", TASK)
    with pytest.raises(DatasetError, match="3 actions for 3 observations"):
        Episode(obs[:3], act, rew, False, True, "x", TASK)
    with pytest.raises(DatasetError, match="rewards must have shape"):
        Episode(obs, act, rew[:2], False, True, "x", TASK)
    with pytest.raises(DatasetError, match=r"discrete.*integers"):
        Episode(obs, act.astype(float), rew, False, True, "x", TASK)
    with pytest.raises(DatasetError, match="at least one transition"):
        Episode(obs[:1], act[:0], rew[:0], False, True, "x", TASK)
    with pytest.raises(DatasetError, match="observations must have shape"):
        Episode(obs.ravel(), act, rew, False, True, "x", TASK)
    with pytest.raises(DatasetError, match="rewards contain NaN or inf"):
        Episode(obs, act, np.array([0.0, np.nan, 1.0]), False, True, "x", TASK)
    with pytest.raises(DatasetError, match="observations contain NaN or inf"):
        Episode(np.full((4, 10), np.inf), act, rew, False, True, "x", TASK)
    with pytest.raises(DatasetError, match="instruction must be a string"):
        Episode(obs, act, rew, False, True, None, TASK)


def test_dataset_checks_consistency() -> None:
    rng = np.random.default_rng(0)
    ep = clevr_episode(3, rng)
    with pytest.raises(DatasetError, match="at least one episode"):
        EpisodeDataset("clevr", (), {})
    odd = Episode(np.zeros((4, 7)), np.zeros(3, dtype=int), np.zeros(3), False, True, "x", TASK)
    with pytest.raises(DatasetError, match="episode 1 has state_dim 7"):
        EpisodeDataset("clevr", (ep, odd), {})
    with pytest.raises(DatasetError, match="not JSON-serialisable"):
        EpisodeDataset("clevr", (ep,), {"x": np.zeros(2)})
    with pytest.raises(DatasetError, match="not JSON-serialisable"):
        EpisodeDataset("clevr", (ep,), {"x": float("nan")})


# ----------------------------------------------------------------------------- corruption
@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    return save_episodes(clevr_dataset(), tmp_path / "good.h5")


def rewrite(path: Path, name: str, data, dtype=None) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data, dtype=dtype)


def test_not_hdf5_files_are_refused(tmp_path: Path, good_file: Path) -> None:
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.h5: the file is empty"):
        load_episodes(empty)
    text = tmp_path / "text.h5"
    text.write_text("observations,actions\n1,2\n")
    with pytest.raises(DatasetError, match=r"text\.h5: not an HDF5 file"):
        load_episodes(text)
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DatasetError, match=r"noise\.h5: not an HDF5 file"):
        load_episodes(noise)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good_file.read_bytes()[: good_file.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"truncated\.h5: (unreadable HDF5|array '\w+' cannot be read)"):
        load_episodes(truncated)
    with pytest.raises(DatasetError, match="no such file"):
        load_episodes(tmp_path / "missing.h5")
    with pytest.raises(DatasetError, match="is a directory"):
        load_episodes(tmp_path)


def test_other_hdf5_files_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("observations", data=np.zeros((3, 10)))
    with pytest.raises(DatasetError, match="missing attribute 'format'"):
        load_episodes(other)


@pytest.mark.parametrize(
    "attr, value, message",
    [
        ("format", "something-else", "attribute 'format' is 'something-else'"),
        ("format_version", 99, "attribute 'format_version' is 99"),
        ("env", "atari", "attribute 'env': unknown environment 'atari'"),
        ("metadata", "{not json", "attribute 'metadata' is not valid JSON"),
        ("metadata", "[1, 2]", "attribute 'metadata' must be a JSON object"),
        ("metadata", '{"x": NaN}', "attribute 'metadata' is not valid JSON"),
    ],
)
def test_bad_attributes_are_refused(good_file: Path, attr: str, value, message: str) -> None:
    with h5py.File(good_file, "r+") as f:
        f.attrs[attr] = value
    with pytest.raises(DatasetError, match=message):
        load_episodes(good_file)


@pytest.mark.parametrize("name", episodes_module._REQUIRED_ARRAYS)
def test_missing_arrays_are_refused(good_file: Path, name: str) -> None:
    with h5py.File(good_file, "r+") as f:
        f.move(name, name + "_renamed")
    with pytest.raises(DatasetError, match=rf"good\.h5: missing array '{name}' \(found unexpected: '{name}_renamed'\)"):
        load_episodes(good_file)


def test_wrong_shapes_and_dtypes_are_refused(good_file: Path) -> None:
    with h5py.File(good_file) as f:
        arrays = {k: f[k][()] for k in f}
    cases = [
        ("observations", arrays["observations"][:, :9], None, "'observations' has state_dim 9, the env has 10"),
        ("observations", arrays["observations"][:-1], None, "'observations' has .* rows but 'episode_lengths' implies"),
        ("observations", arrays["observations"].astype(np.int32), None, "'observations' has dtype int32, expected floats"),
        ("observations", arrays["observations"][..., None], None, "'observations' has shape .* expected 2 dimension"),
        ("actions", arrays["actions"][:-1], None, "'actions' has .* rows but 'episode_lengths' sums to"),
        ("actions", arrays["actions"].astype(np.float32), None, "'actions' has dtype float32, expected integers"),
        ("rewards", arrays["rewards"][1:], None, "'rewards' has .* rows but 'episode_lengths' sums to"),
        ("rewards", arrays["rewards"].astype("S8"), None, "'rewards' has dtype"),
        ("episode_lengths", arrays["episode_lengths"] + 1, None, "rows but 'episode_lengths' implies"),
        ("episode_lengths", np.array([], dtype=np.int64), None, "'episode_lengths' is empty"),
        ("episode_lengths", np.r_[arrays["episode_lengths"][:-1], 0], None, "episode 3 has length 0"),
        ("terminated", arrays["terminated"][:2], None, "'terminated' has 2 entries for 4 episodes"),
        ("truncated", arrays["truncated"].astype(np.int8), None, "'truncated' has dtype int8, expected booleans"),
        ("instructions", ["a", "b"], h5py.string_dtype(), "'instructions' has 2 entries for 4 episodes"),
        ("instructions", np.zeros(4), None, "'instructions' has dtype float64, expected UTF-8 strings"),
    ]
    for name, data, dtype, message in cases:
        original = arrays[name]
        rewrite(good_file, name, data, dtype)
        with pytest.raises(DatasetError, match=message):
            load_episodes(good_file)
        rewrite(good_file, name, original, h5py.string_dtype() if name in ("instructions", "tasks") else None)
    load_episodes(good_file)


@pytest.mark.parametrize("name", ["observations", "rewards"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(good_file: Path, name: str, bad: float) -> None:
    with h5py.File(good_file, "r+") as f:
        f[name][2] = bad
    with pytest.raises(DatasetError, match=f"array '{name}' contains NaN or inf .first at index .2"):
        load_episodes(good_file)


@pytest.mark.parametrize("action", [-1, 40, 1000])
def test_actions_outside_the_space_are_refused(good_file: Path, action: int) -> None:
    with h5py.File(good_file, "r+") as f:
        f["actions"][3] = action
    with pytest.raises(DatasetError, match=rf"action {action} at step 3 is outside Discrete\(40\)"):
        load_episodes(good_file)


@pytest.mark.parametrize(
    "task, message",
    [
        ('{"kind": "relation", "object": "pink", "anchor": "blue", "direction": "left"}', "unknown colour 'pink'"),
        ('{"kind": "teleport"}', "unknown kind 'teleport'"),
        ("{broken", "not valid JSON"),
    ],
)
def test_bad_tasks_are_refused_with_the_episode_index(good_file: Path, task: str, message: str) -> None:
    with h5py.File(good_file, "r+") as f:
        tasks = f["tasks"].asstr()[()].tolist()
        tasks[2] = task
        del f["tasks"]
        f.create_dataset("tasks", data=tasks, dtype=h5py.string_dtype())
    with pytest.raises(DatasetError, match=f"array 'tasks', episode 2: .*{message}"):
        load_episodes(good_file)


# ----------------------------------------------------------------------------- atomic writes
def test_interrupted_write_leaves_nothing_at_the_target(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "data.h5"
    real_create = h5py.Group.create_dataset

    def failing_create(self, name, *args, **kwargs):
        if name == "rewards":
            raise KeyboardInterrupt("killed mid-write")
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(KeyboardInterrupt):
        save_episodes(clevr_dataset(), target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    target = save_episodes(clevr_dataset(n=2), tmp_path / "data.h5")
    before = target.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_episodes(clevr_dataset(n=5), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.h5"]
    assert len(load_episodes(target)) == 2


def test_saved_metadata_round_trips_as_json(tmp_path: Path) -> None:
    data = clevr_dataset()
    path = save_episodes(data, tmp_path / "m.h5")
    with h5py.File(path) as f:
        assert json.loads(f.attrs["metadata"]) == data.metadata
        assert f["tasks"].dtype.kind == "O" and h5py.check_string_dtype(f["tasks"].dtype).encoding == "utf-8"
