"""Property tests for the episode-file validator: whatever the file holds, loading either
returns a consistent dataset or raises DatasetError, never anything else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalm.data.episodes import DatasetError, Episode, EpisodeDataset, load_episodes, save_episodes
from kalm.envs import get_spec

SPEC = get_spec("clevr")
NAMES = ("observations", "actions", "rewards", "episode_lengths", "terminated", "truncated", "instructions", "tasks")
TASK = '{"kind": "relation", "object": "red", "anchor": "blue", "direction": "left"}'
DTYPES = (np.float32, np.float64, np.int64, np.int8, np.uint16, bool)

settings.register_profile("kalm", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kalm")


def _check_result(data: EpisodeDataset) -> None:
    """What a successful load promises."""
    for ep in data.episodes:
        assert ep.observations.shape == (ep.length + 1, SPEC.state_dim)
        assert np.all(np.isfinite(ep.observations)) and np.all(np.isfinite(ep.rewards))
        assert np.all((ep.actions >= 0) & (ep.actions < SPEC.action_dim))
        SPEC.parse_task(ep.task)


def _load(path: Path) -> None:
    try:
        _check_result(load_episodes(path))
    except DatasetError as exc:
        assert str(path) in str(exc)


array_strategy = st.tuples(
    st.sampled_from(DTYPES),
    st.lists(st.integers(0, 12), min_size=0, max_size=3),
    st.sampled_from([0.0, 1.0, -1.0, 39.0, 40.0, np.nan, np.inf, 0.3]),
)


@given(
    arrays=st.dictionaries(st.sampled_from((*NAMES, "extra")), array_strategy, min_size=0, max_size=9),
    strings=st.dictionaries(
        st.sampled_from(("instructions", "tasks")),
        st.lists(st.sampled_from(["", "push", TASK, "{", '{"kind": "line"}', "[]", "null", "é"]), max_size=4),
    ),
    env=st.sampled_from(["clevr", "", "nope"]),
    version=st.sampled_from([1, 2, "1"]),
    metadata=st.sampled_from(["{}", '{"a": 1}', "", "[]", "{"]),
)
def test_random_files_load_or_raise_dataset_error(arrays, strings, env, version, metadata) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.h5"
        with h5py.File(path, "w") as f:
            f.attrs["format"] = "kalm-episodes"
            f.attrs["format_version"] = version
            f.attrs["env"] = env
            f.attrs["metadata"] = metadata
            for name, (dtype, shape, fill) in arrays.items():
                data = np.full(shape, fill).astype(dtype) if np.isfinite(fill) or dtype in (np.float32, np.float64) else np.zeros(shape, dtype)
                f.create_dataset(name, data=data)
            for name, texts in strings.items():
                if name in f:
                    del f[name]
                f.create_dataset(name, data=texts, dtype=h5py.string_dtype())
        _load(path)


def _valid_file(path: Path, lengths: list[int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    eps = tuple(
        Episode(rng.uniform(-0.4, 0.5, (t + 1, 10)), rng.integers(0, 40, t), rng.normal(size=t), bool(t % 2), False,
                "Push the red ball to the left of the blue ball", {"kind": "relation", "object": "red",
                                                                   "anchor": "blue", "direction": "left"})
        for t in lengths
    )
    return save_episodes(EpisodeDataset("clevr", eps, {"seed": seed}), path)


@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.none() | st.floats(0, 1),
)
def test_damaged_bytes_load_or_raise_dataset_error(lengths, flips, cut) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _valid_file(Path(tmp) / "damaged.h5", lengths, seed=len(lengths))
        raw = bytearray(path.read_bytes())
        for position, value in flips:
            raw[int(position * len(raw))] = value
        if cut is not None:
            raw = raw[: int(cut * len(raw))]
        path.write_bytes(bytes(raw))
        _load(path)


@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_valid_files_round_trip(lengths, seed) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = _valid_file(Path(tmp) / "valid.h5", lengths, seed)
        data = load_episodes(path)
        assert [ep.length for ep in data.episodes] == lengths
        _check_result(data)
