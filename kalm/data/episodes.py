"""The one on-disk episode format of kalm: real, imported and imagined rollouts alike.

Every stage downstream (offline RL, grounding, evaluation) reads episodes through
:func:`load_episodes`, so the loader is the single place where a damaged or foreign
file is caught; it refuses anything it cannot fully vouch for with a
:class:`DatasetError` naming the file and the array, attribute or episode at fault.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec, TaskSpecError
from kalm.files import write_atomic

FORMAT_NAME = "kalm-episodes"
FORMAT_VERSION = 1
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_STRING_DTYPE = h5py.string_dtype(encoding="utf-8")
_PER_EPISODE = ("episode_lengths", "terminated", "truncated", "instructions", "tasks")
_REQUIRED_ARRAYS = ("observations", "actions", "rewards", *_PER_EPISODE)


class DatasetError(ValueError):
    """An episode file or episode is malformed; the message names the file and the
    field, array or episode at fault."""


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
@dataclass(frozen=True)
class ActionCheck:
    """What a valid action looks like: discrete ``0 <= a < n``, or a float vector of
    ``shape`` inside ``[low, high]``. Built from a Gymnasium action space."""

    discrete: bool
    n: int = 0
    shape: tuple[int, ...] = ()
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    @classmethod
    def from_space(cls, space: gym.spaces.Space) -> ActionCheck:
        if isinstance(space, gym.spaces.Discrete):
            if int(space.start) != 0:
                raise DatasetError(f"discrete action spaces must start at 0, got start={space.start}")
            return cls(discrete=True, n=int(space.n))
        if isinstance(space, gym.spaces.Box):
            return cls(
                discrete=False,
                shape=tuple(space.shape),
                low=np.asarray(space.low, dtype=np.float64),
                high=np.asarray(space.high, dtype=np.float64),
            )
        raise DatasetError(f"unsupported action space {space!r} (Discrete or Box only)")


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
    with _open_hdf5(path) as f:
        where = str(path)
        _check_format(f, where)
        env = _string_attr(f, "env", where)
        metadata = _metadata(f, where)
        if spec is None:
            try:
                spec = get_spec(env)
            except ValueError as exc:
                raise DatasetError(f"{where}: attribute 'env': {exc}") from exc
        elif spec.name != env:
            raise DatasetError(f"{where}: attribute 'env' is {env!r} but the file was loaded for {spec.name!r}")
        arrays = _read_arrays(f, where, spec.state_dim, ActionCheck.from_space(spec.action_space))
    tasks = _parse_tasks(arrays["tasks"], spec.parse_task, where)
    episodes = _split_episodes(arrays, tasks, where)
    return EpisodeDataset(env=env, episodes=episodes, metadata=metadata)


class _open_hdf5:
    """Open ``path`` read-only, turning every way of not being an HDF5 file (missing,
    empty, truncated, random bytes, text) into a :class:`DatasetError`."""

    def __init__(self, path: Path):
        self.path = path
        self.file: h5py.File | None = None

    def __enter__(self) -> h5py.File:
        path = self.path
        if not path.exists():
            raise DatasetError(f"{path}: no such file")
        if path.is_dir():
            raise DatasetError(f"{path}: is a directory, not an episode file")
        size = path.stat().st_size
        if size == 0:
            raise DatasetError(f"{path}: the file is empty (0 bytes), not an HDF5 episode file")
        with open(path, "rb") as handle:
            head = handle.read(len(HDF5_SIGNATURE))
        if head != HDF5_SIGNATURE and not h5py.is_hdf5(path):
            raise DatasetError(f"{path}: not an HDF5 file (no HDF5 signature at the start; {size} bytes)")
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise DatasetError(f"{path}: unreadable HDF5 file, probably truncated or damaged ({exc})") from exc
        return self.file

    def __exit__(self, *exc_info: Any) -> None:
        if self.file is not None:
            self.file.close()


def _read_error(where: str, name: str, exc: Exception) -> DatasetError:
    return DatasetError(f"{where}: array '{name}' cannot be read, the file is probably truncated ({exc})")


def _check_format(f: h5py.File, where: str) -> None:
    if f.attrs.get("format") is None:
        raise DatasetError(f"{where}: missing attribute 'format' (not a kalm episode file)")
    fmt = _string_attr(f, "format", where)
    if fmt != FORMAT_NAME:
        raise DatasetError(f"{where}: attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r}")
    version = f.attrs.get("format_version")
    if version is None:
        raise DatasetError(f"{where}: missing attribute 'format_version'")
    if not isinstance(version, (int, np.integer)) or int(version) != FORMAT_VERSION:
        shown = int(version) if isinstance(version, (int, np.integer)) else repr(version)
        raise DatasetError(f"{where}: attribute 'format_version' is {shown}; this kalm reads version {FORMAT_VERSION}")


def _string_attr(f: h5py.File, name: str, where: str) -> str:
    value = f.attrs.get(name)
    if value is None:
        raise DatasetError(f"{where}: missing attribute '{name}'")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{where}: attribute '{name}' is not UTF-8 text") from exc
    if not isinstance(value, str):
        raise DatasetError(f"{where}: attribute '{name}' must be a string, got {type(value).__name__}")
    return value


def _metadata(f: h5py.File, where: str) -> dict:
    text = _string_attr(f, "metadata", where)
    try:
        metadata = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise DatasetError(f"{where}: attribute 'metadata' is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise DatasetError(f"{where}: attribute 'metadata' must be a JSON object, got {type(metadata).__name__}")
    return metadata


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
    if name not in f:
        expected = set(_REQUIRED_ARRAYS)
        unexpected = sorted(k for k in f if k not in expected)
        hint = f" (found unexpected: {', '.join(map(repr, unexpected))})" if unexpected else ""
        raise DatasetError(f"{where}: missing array '{name}'{hint}")
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise DatasetError(f"{where}: '{name}' is a {type(obj).__name__}, expected an array")
    return obj


def _numeric(f: h5py.File, name: str, where: str, kinds: str, ndim: int) -> np.ndarray:
    ds = _dataset(f, name, where)
    if ds.dtype.kind not in kinds:
        wanted = {"f": "floats", "iu": "integers", "b": "booleans"}.get(kinds, kinds)
        raise DatasetError(f"{where}: array '{name}' has dtype {ds.dtype}, expected {wanted}")
    if ds.ndim != ndim:
        raise DatasetError(f"{where}: array '{name}' has shape {ds.shape}, expected {ndim} dimension(s)")
    try:
        data = ds[()]
    except (OSError, RuntimeError) as exc:
        raise _read_error(where, name, exc) from exc
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        bad = np.argwhere(~np.isfinite(data))[0]
        raise DatasetError(f"{where}: array '{name}' contains NaN or inf (first at index {tuple(int(i) for i in bad)})")
    return data


def _strings(f: h5py.File, name: str, where: str) -> list[str]:
    ds = _dataset(f, name, where)
    if h5py.check_string_dtype(ds.dtype) is None:
        raise DatasetError(f"{where}: array '{name}' has dtype {ds.dtype}, expected UTF-8 strings")
    if ds.ndim != 1:
        raise DatasetError(f"{where}: array '{name}' has shape {ds.shape}, expected (n_episodes,)")
    try:
        return list(ds.asstr()[()])
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: array '{name}' holds text that is not UTF-8 ({exc})") from exc
    except (OSError, RuntimeError) as exc:
        raise _read_error(where, name, exc) from exc


def _read_arrays(f: h5py.File, where: str, state_dim: int, check: ActionCheck) -> dict[str, Any]:
    lengths = _numeric(f, "episode_lengths", where, "iu", 1).astype(np.int64)
    n = len(lengths)
    if n == 0:
        raise DatasetError(f"{where}: array 'episode_lengths' is empty (the file holds no episodes)")
    if np.any(lengths < 1):
        i = int(np.argmax(lengths < 1))
        raise DatasetError(f"{where}: array 'episode_lengths': episode {i} has length {lengths[i]} (must be >= 1)")
    transitions = int(lengths.sum())
    arrays: dict[str, Any] = {"episode_lengths": lengths}

    obs = _numeric(f, "observations", where, "f", 2)
    if obs.shape[1] != state_dim:
        raise DatasetError(f"{where}: array 'observations' has state_dim {obs.shape[1]}, the env has {state_dim}")
    if obs.shape[0] != transitions + n:
        raise DatasetError(
            f"{where}: array 'observations' has {obs.shape[0]} rows but 'episode_lengths' implies "
            f"{transitions + n} (sum of T+1 over {n} episodes)"
        )
    arrays["observations"] = obs

    if check.discrete:
        actions = _numeric(f, "actions", where, "iu", 1)
        if actions.size and (actions.min() < 0 or actions.max() >= check.n):
            i = int(np.argmax((actions < 0) | (actions >= check.n)))
            raise DatasetError(
                f"{where}: array 'actions': action {int(actions[i])} at step {i} is outside Discrete({check.n})"
            )
    else:
        actions = _numeric(f, "actions", where, "f", 1 + len(check.shape))
        if actions.shape[1:] != check.shape:
            raise DatasetError(
                f"{where}: array 'actions' has shape {actions.shape}, expected (n_transitions, "
                f"{', '.join(map(str, check.shape))})"
            )
        outside = np.any((actions < check.low - 1e-6) | (actions > check.high + 1e-6),
                         axis=tuple(range(1, actions.ndim)))
        if np.any(outside):
            i = int(np.argmax(outside))
            raise DatasetError(f"{where}: array 'actions': action at step {i} is outside the action space bounds")
    if actions.shape[0] != transitions:
        raise DatasetError(
            f"{where}: array 'actions' has {actions.shape[0]} rows but 'episode_lengths' sums to {transitions}"
        )
    arrays["actions"] = actions

    rewards = _numeric(f, "rewards", where, "f", 1)
    if rewards.shape[0] != transitions:
        raise DatasetError(
            f"{where}: array 'rewards' has {rewards.shape[0]} rows but 'episode_lengths' sums to {transitions}"
        )
    arrays["rewards"] = rewards

    for name in ("terminated", "truncated"):
        flags = _numeric(f, name, where, "b", 1)
        if flags.shape[0] != n:
            raise DatasetError(f"{where}: array '{name}' has {flags.shape[0]} entries for {n} episodes")
        arrays[name] = flags
    for name in ("instructions", "tasks"):
        texts = _strings(f, name, where)
        if len(texts) != n:
            raise DatasetError(f"{where}: array '{name}' has {len(texts)} entries for {n} episodes")
        arrays[name] = texts
    return arrays


def _parse_tasks(texts: list[str], parse_task: Callable[[Mapping[str, Any]], Any], where: str) -> list[dict]:
    """Parse each task's JSON and check it with the env's parser (cached: datasets
    repeat the same few tasks thousands of times)."""
    checked: dict[str, dict] = {}
    tasks = []
    for i, text in enumerate(texts):
        if text not in checked:
            try:
                task_json = json.loads(text, parse_constant=_refuse_constant)
            except ValueError as exc:
                raise DatasetError(f"{where}: array 'tasks', episode {i}: not valid JSON ({exc})") from exc
            try:
                parse_task(task_json)
            except TaskSpecError as exc:
                raise DatasetError(f"{where}: array 'tasks', episode {i}: {exc}") from exc
            checked[text] = task_json
        tasks.append(checked[text])
    return tasks


def _split_episodes(arrays: dict[str, Any], tasks: list[dict], where: str) -> tuple[Episode, ...]:
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

