"""The one on-disk episode format of kalm: real, imported and imagined rollouts alike.

Every stage downstream (offline RL, grounding, evaluation) reads episodes through
:func:`load_episodes`, so the loader is the single place where a damaged or foreign
file is caught; it refuses anything it cannot fully vouch for with a
:class:`DatasetError` naming the file and the array, attribute or episode at fault.
The checks of the file itself live in :mod:`kalm.data.episode_reader`; this module
holds the episodes in memory, the writer and the public entry points.

Layout of the HDF5 file (format version 1)::

    attrs:  format="kalm-episodes", format_version=1, env=<EnvSpec.name>,
            metadata=<JSON object>
    observations    (sum(T_i + 1), state_dim) float32   s_0..s_T of each episode, concatenated
    actions         (sum(T_i),) int64 | (sum(T_i), action_dim) float32
    rewards         (sum(T_i),) float32
    episode_lengths (N,) int64                          T_i >= 1
    terminated      (N,) bool
    truncated       (N,) bool
    instructions    (N,) UTF-8 variable-length strings
    tasks           (N,) UTF-8 variable-length strings   the task's JSON form

Episode boundaries follow from ``episode_lengths`` alone (an episode holds T_i
transitions and T_i + 1 observations), so there is no second source of truth that
could disagree with it. No pickle is involved anywhere: strings are stored as HDF5
strings and metadata as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from kalm.data.episode_format import FORMAT_NAME, FORMAT_VERSION, DatasetError
from kalm.data.episode_format import REQUIRED_ARRAYS as _REQUIRED_ARRAYS  # noqa: F401 (tests parametrize over it)
from kalm.data.episode_reader import HDF5_SIGNATURE, ActionCheck, read_episode_file
from kalm.envs.spec import EnvSpec
from kalm.files import write_atomic

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HDF5_SIGNATURE",
    "ActionCheck",
    "DatasetError",
    "Episode",
    "EpisodeDataset",
    "load_episodes",
    "save_episodes",
    "success_disagreements",
]

_STRING_DTYPE = h5py.string_dtype(encoding="utf-8")


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Episode:
    """One episode: T transitions between T + 1 states.

    Arrays are copied, converted to the canonical dtypes and made read-only, so a
    dataset cannot be changed behind the back of whoever validated it. Discrete
    actions are a 1-D integer array, continuous actions a 2-D float array.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: bool
    truncated: bool
    instruction: str
    task: dict

    def __post_init__(self) -> None:
        obs = np.asarray(self.observations)
        actions = np.asarray(self.actions)
        rewards = np.asarray(self.rewards)
        if obs.ndim != 2 or obs.shape[1] < 1:
            raise DatasetError(f"Episode: observations must have shape (T+1, state_dim), got {obs.shape}")
        if not np.issubdtype(obs.dtype, np.number) or np.issubdtype(obs.dtype, np.complexfloating):
            raise DatasetError(f"Episode: observations must be real numbers, got dtype {obs.dtype}")
        length = obs.shape[0] - 1
        if length < 1:
            raise DatasetError("Episode: an episode needs at least one transition (two observations)")
        if actions.ndim == 1:
            if not np.issubdtype(actions.dtype, np.integer):
                raise DatasetError(f"Episode: 1-D (discrete) actions must be integers, got dtype {actions.dtype}")
            actions = actions.astype(np.int64)
        elif actions.ndim == 2:
            if not np.issubdtype(actions.dtype, np.floating):
                raise DatasetError(f"Episode: 2-D (continuous) actions must be floats, got dtype {actions.dtype}")
            actions = actions.astype(np.float32)
        else:
            raise DatasetError(f"Episode: actions must have shape (T,) or (T, action_dim), got {actions.shape}")
        if actions.shape[0] != length:
            raise DatasetError(
                f"Episode: {actions.shape[0]} actions for {obs.shape[0]} observations (expected T={length})"
            )
        if rewards.shape != (length,):
            raise DatasetError(f"Episode: rewards must have shape ({length},), got {rewards.shape}")
        if not np.issubdtype(rewards.dtype, np.number):
            raise DatasetError(f"Episode: rewards must be numbers, got dtype {rewards.dtype}")
        for name, values in (("observations", obs), ("actions", actions), ("rewards", rewards)):
            if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
                raise DatasetError(f"Episode: {name} contain NaN or inf")
        if not isinstance(self.instruction, str):
            raise DatasetError(f"Episode: instruction must be a string, got {type(self.instruction).__name__}")
        if not isinstance(self.task, Mapping):
            raise DatasetError(f"Episode: task must be the task's JSON object, got {type(self.task).__name__}")
        object.__setattr__(self, "observations", _readonly(obs.astype(np.float32)))
        object.__setattr__(self, "actions", _readonly(actions))
        object.__setattr__(self, "rewards", _readonly(rewards.astype(np.float32)))
        object.__setattr__(self, "terminated", bool(self.terminated))
        object.__setattr__(self, "truncated", bool(self.truncated))
        object.__setattr__(self, "task", dict(self.task))

    @property
    def length(self) -> int:
        """T, the number of transitions."""
        return int(self.actions.shape[0])

    @property
    def state_dim(self) -> int:
        return int(self.observations.shape[1])


@dataclass(frozen=True)
class EpisodeDataset:
    """Episodes of one environment plus their provenance.

    ``metadata`` records where the episodes came from (``source``: expert / import /
    imagined, seed, reward kind, epsilon, model, level, filters ...); it must be
    JSON-serialisable because it is stored as JSON.
    """

    env: str
    episodes: tuple[Episode, ...]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.env, str) or not self.env:
            raise DatasetError(f"EpisodeDataset: env must be a non-empty environment name, got {self.env!r}")
        episodes = tuple(self.episodes)
        if not episodes:
            raise DatasetError("EpisodeDataset: a dataset needs at least one episode")
        for i, ep in enumerate(episodes):
            if not isinstance(ep, Episode):
                raise DatasetError(f"EpisodeDataset: episode {i} is a {type(ep).__name__}, not an Episode")
        first = episodes[0]
        for i, ep in enumerate(episodes):
            if ep.state_dim != first.state_dim:
                raise DatasetError(
                    f"EpisodeDataset: episode {i} has state_dim {ep.state_dim}, episode 0 has {first.state_dim}"
                )
            if ep.actions.shape[1:] != first.actions.shape[1:] or ep.actions.dtype != first.actions.dtype:
                raise DatasetError(
                    f"EpisodeDataset: episode {i} has actions of shape (T,{','.join(map(str, ep.actions.shape[1:]))})"
                    f" {ep.actions.dtype}, episode 0 has (T,{','.join(map(str, first.actions.shape[1:]))})"
                    f" {first.actions.dtype}"
                )
        if not isinstance(self.metadata, Mapping):
            raise DatasetError(f"EpisodeDataset: metadata must be a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"EpisodeDataset: metadata is not JSON-serialisable: {exc}") from exc
        object.__setattr__(self, "episodes", episodes)
        object.__setattr__(self, "metadata", dict(self.metadata))

    def __len__(self) -> int:
        return len(self.episodes)

    @property
    def n_transitions(self) -> int:
        return sum(ep.length for ep in self.episodes)

    @property
    def success_rate(self) -> float:
        return sum(ep.terminated for ep in self.episodes) / len(self.episodes)


# ----------------------------------------------------------------------------- writing
def save_episodes(dataset: EpisodeDataset, path: str | os.PathLike) -> Path:
    """Write ``dataset`` to ``path`` atomically (:func:`kalm.files.write_atomic`)
    and return the path: a crash at any point leaves either the old file or nothing at
    ``path``, never a half-written one that might load."""
    if not isinstance(dataset, EpisodeDataset):
        raise DatasetError(f"save_episodes: expected an EpisodeDataset, got {type(dataset).__name__}")
    path = Path(path)
    return write_atomic(path, lambda f: f.write(_hdf5_image(dataset, path.name)))


def _hdf5_image(dataset: EpisodeDataset, name: str) -> bytes:
    """The bytes of the HDF5 file holding ``dataset``, built in memory.

    Only plain file I/O then touches the disk, so a failed write (disk full, a file
    size limit) is one clean ``OSError``; HDF5 writing to disk itself reports it as
    errors from ``close`` and keeps a broken handle that crashes the process at exit.
    """
    episodes = dataset.episodes
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["env"] = dataset.env
        f.attrs["metadata"] = json.dumps(dataset.metadata, allow_nan=False, sort_keys=True)
        f.create_dataset("observations", data=np.concatenate([ep.observations for ep in episodes]))
        f.create_dataset("actions", data=np.concatenate([ep.actions for ep in episodes]))
        f.create_dataset("rewards", data=np.concatenate([ep.rewards for ep in episodes]))
        f.create_dataset("episode_lengths", data=np.array([ep.length for ep in episodes], dtype=np.int64))
        f.create_dataset("terminated", data=np.array([ep.terminated for ep in episodes], dtype=bool))
        f.create_dataset("truncated", data=np.array([ep.truncated for ep in episodes], dtype=bool))
        f.create_dataset("instructions", data=[ep.instruction for ep in episodes], dtype=_STRING_DTYPE)
        task_json = [json.dumps(ep.task, allow_nan=False, sort_keys=True) for ep in episodes]
        f.create_dataset("tasks", data=task_json, dtype=_STRING_DTYPE)
        f.flush()
        return f.id.get_file_image()


# ----------------------------------------------------------------------------- reading
def load_episodes(path: str | os.PathLike, spec: EnvSpec | None = None) -> EpisodeDataset:
    """Read and validate an episode file.

    ``spec`` defaults to the registered spec of the environment named in the file; when
    given, the file must name the same environment. Observations must match
    ``spec.state_dim``, actions ``spec.action_space``, and every task must parse with
    ``spec.parse_task``. Anything else is refused with a :class:`DatasetError`.
    """
    path = Path(path)
    try:
        return _load(path, spec)
    except DatasetError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        # h5py reports damage deep inside a file (bad object headers, checksums) from
        # wherever it first touches it; all of it means the same thing here.
        raise DatasetError(f"{path}: damaged HDF5 file, cannot be read ({type(exc).__name__}: {exc})") from exc


def _load(path: Path, spec: EnvSpec | None) -> EpisodeDataset:
    checked = read_episode_file(path, spec)
    episodes = _split_episodes(checked.arrays, checked.tasks, str(path))
    return EpisodeDataset(env=checked.env, episodes=episodes, metadata=checked.metadata)


def _split_episodes(arrays: dict[str, Any], tasks: list[dict], where: str) -> tuple[Episode, ...]:
    """Cut the checked, concatenated arrays into episodes; each :class:`Episode`
    checks itself, and its error gains the file and the episode's index."""
    lengths = arrays["episode_lengths"]
    obs_ends = np.cumsum(lengths + 1)
    step_ends = np.cumsum(lengths)
    episodes = []
    for i, length in enumerate(lengths):
        o1, s1 = int(obs_ends[i]), int(step_ends[i])
        o0, s0 = o1 - int(length) - 1, s1 - int(length)
        try:
            episodes.append(
                Episode(
                    observations=arrays["observations"][o0:o1],
                    actions=arrays["actions"][s0:s1],
                    rewards=arrays["rewards"][s0:s1],
                    terminated=bool(arrays["terminated"][i]),
                    truncated=bool(arrays["truncated"][i]),
                    instruction=arrays["instructions"][i],
                    task=tasks[i],
                )
            )
        except DatasetError as exc:
            raise DatasetError(f"{where}: episode {i}: {exc}") from exc
    return tuple(episodes)


def success_disagreements(dataset: EpisodeDataset, spec: EnvSpec) -> list[int]:
    """Indices of episodes whose ``terminated`` flag disagrees with the task's success
    predicate evaluated on their last state (imported or imagined data may carry
    flags computed by another judge)."""
    bad = []
    for i, ep in enumerate(dataset.episodes):
        task = spec.parse_task(ep.task)
        holds = bool(task.success(ep.observations[-1], ep.observations[0]))
        if holds != ep.terminated:
            bad.append(i)
    return bad

