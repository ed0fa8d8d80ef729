"""The validating reader of episode files (layout: :mod:`kalm.data.episodes`).

Every stage reads episodes through :func:`kalm.data.episodes.load_episodes`, which
uses :func:`read_episode_file`, so this is the one place where a damaged or foreign
file is caught. Each check raises a :class:`DatasetError` naming the file and the
attribute or array at fault, and the arrays are checked in a fixed order (lengths
first, since every other array's size follows from them), so a file with several
faults always reports the same one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np

from kalm.data.episode_format import FORMAT_NAME, FORMAT_VERSION, REQUIRED_ARRAYS, DatasetError
from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec, TaskSpecError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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


@dataclass(frozen=True)
class CheckedFile:
    """An episode file's contents once every check has passed: the concatenated
    arrays (keyed by their names in the file) and each episode's parsed task."""

    env: str
    metadata: dict
    arrays: dict[str, Any]
    tasks: list[dict]


def read_episode_file(path: Path, spec: EnvSpec | None) -> CheckedFile:
    """Read and check the file at ``path`` for ``spec`` (default: the registered spec
    of the environment the file names; when given, the file must name it)."""
    with _open_hdf5(path) as f:
        where = str(path)
        _check_format(f, where)
        env = _string_attr(f, "env", where)
        metadata = _metadata(f, where)
        spec = _spec_for(env, spec, where)
        arrays = _read_arrays(f, where, spec.state_dim, ActionCheck.from_space(spec.action_space))
    tasks = _parse_tasks(arrays["tasks"], spec.parse_task, where)
    return CheckedFile(env=env, metadata=metadata, arrays=arrays, tasks=tasks)


def _spec_for(env: str, spec: EnvSpec | None, where: str) -> EnvSpec:
    if spec is None:
        try:
            return get_spec(env)
        except ValueError as exc:
            raise DatasetError(f"{where}: attribute 'env': {exc}") from exc
    if spec.name != env:
        raise DatasetError(f"{where}: attribute 'env' is {env!r} but the file was loaded for {spec.name!r}")
    return spec


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


# ----------------------------------------------------------------------------- attributes
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


# ----------------------------------------------------------------------------- one array
def _read_error(where: str, name: str, exc: Exception) -> DatasetError:
    return DatasetError(f"{where}: array '{name}' cannot be read, the file is probably truncated ({exc})")


def _dataset(f: h5py.File, name: str, where: str) -> h5py.Dataset:
    if name not in f:
        expected = set(REQUIRED_ARRAYS)
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


# ----------------------------------------------------------------------------- all arrays
def _read_arrays(f: h5py.File, where: str, state_dim: int, check: ActionCheck) -> dict[str, Any]:
    """Every array, checked against the env and against ``episode_lengths``."""
    lengths = _episode_lengths(f, where)
    n, transitions = len(lengths), int(lengths.sum())
    arrays: dict[str, Any] = {"episode_lengths": lengths}
    arrays["observations"] = _observations(f, where, state_dim, n, transitions)
    arrays["actions"] = _actions(f, where, check, transitions)
    rewards = _numeric(f, "rewards", where, "f", 1)
    _require_rows("rewards", rewards.shape[0], transitions, where)
    arrays["rewards"] = rewards
    for name in ("terminated", "truncated"):
        flags = _numeric(f, name, where, "b", 1)
        _require_entries(name, flags.shape[0], n, where)
        arrays[name] = flags
    for name in ("instructions", "tasks"):
        texts = _strings(f, name, where)
        _require_entries(name, len(texts), n, where)
        arrays[name] = texts
    return arrays


def _episode_lengths(f: h5py.File, where: str) -> np.ndarray:
    lengths = _numeric(f, "episode_lengths", where, "iu", 1).astype(np.int64)
    if len(lengths) == 0:
        raise DatasetError(f"{where}: array 'episode_lengths' is empty (the file holds no episodes)")
    if np.any(lengths < 1):
        i = int(np.argmax(lengths < 1))
        raise DatasetError(f"{where}: array 'episode_lengths': episode {i} has length {lengths[i]} (must be >= 1)")
    return lengths


def _observations(f: h5py.File, where: str, state_dim: int, n: int, transitions: int) -> np.ndarray:
    obs = _numeric(f, "observations", where, "f", 2)
    if obs.shape[1] != state_dim:
        raise DatasetError(f"{where}: array 'observations' has state_dim {obs.shape[1]}, the env has {state_dim}")
    if obs.shape[0] != transitions + n:
        raise DatasetError(
            f"{where}: array 'observations' has {obs.shape[0]} rows but 'episode_lengths' implies "
            f"{transitions + n} (sum of T+1 over {n} episodes)"
        )
    return obs


def _actions(f: h5py.File, where: str, check: ActionCheck, transitions: int) -> np.ndarray:
    actions = _discrete_actions(f, where, check.n) if check.discrete else _continuous_actions(f, where, check)
    _require_rows("actions", actions.shape[0], transitions, where)
    return actions


def _discrete_actions(f: h5py.File, where: str, n_actions: int) -> np.ndarray:
    actions = _numeric(f, "actions", where, "iu", 1)
    if actions.size and (actions.min() < 0 or actions.max() >= n_actions):
        i = int(np.argmax((actions < 0) | (actions >= n_actions)))
        raise DatasetError(
            f"{where}: array 'actions': action {int(actions[i])} at step {i} is outside Discrete({n_actions})"
        )
    return actions


def _continuous_actions(f: h5py.File, where: str, check: ActionCheck) -> np.ndarray:
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
    return actions


def _require_rows(name: str, rows: int, transitions: int, where: str) -> None:
    if rows != transitions:
        raise DatasetError(f"{where}: array '{name}' has {rows} rows but 'episode_lengths' sums to {transitions}")


def _require_entries(name: str, entries: int, n: int, where: str) -> None:
    if entries != n:
        raise DatasetError(f"{where}: array '{name}' has {entries} entries for {n} episodes")


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
