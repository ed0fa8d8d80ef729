"""Minari export and import of kalm episode datasets, so that Minari and d3rlpy users can
open kalm's data, and kalm can read it back with nothing lost.

Usage (``root`` defaults to ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``)::

    export_minari(load_episodes("expert.h5"), "kalm/clevr-expert-v0")   # kalm data export-minari expert.h5 --id ...
    minari.load_dataset("kalm/clevr-expert-v0").recover_environment()    # a kalm env, made by gym.make
    dataset = import_minari("kalm/clevr-expert-v0")                       # kalm data import-minari ID --out x.h5

Layout of an exported dataset (minari 0.5, hdf5 data format):

* one Minari episode per kalm episode: observations ``(T+1, state_dim)`` float32,
  actions ``(T,)`` int64 or ``(T, action_dim)`` float32, rewards ``(T,)`` float32, and
  terminations/truncations ``(T,)`` that are False except at the last step, which
  carries the episode's own flags;
* each episode's ``instruction`` (text) and ``task`` (the task's JSON text) are Minari
  *episode metadata*: attributes of the episode, read with
  ``dataset.storage.get_episode_metadata(dataset.episode_indices)``. Per-step ``infos``
  would repeat one string T+1 times, and reset ``options`` are flattened by minari into
  one attribute per key, which cannot hold a task's list of sub-tasks;
* the dataset metadata (``metadata.json``) holds ``kalm``: the env name, kalm's dataset
  metadata and the layout version;
* ``env_spec`` and ``eval_env_spec`` are the env's Gymnasium spec (``kalm/CLEVRRobot-v0``,
  ``kalm/MetaWorld-v0``). Its entry point names the kalm module, so
  ``recover_environment()`` works wherever kalm (and, for Meta-World, the ``metaworld``
  extra) is installed, without importing kalm first. The recovered env replays an
  episode's start and goal with ``env.reset(options={"task": json.loads(task),
  "state": observations[0]})``;
* the observation space is an unbounded Box of ``state_dim``: imagined states are not
  promised to stay inside the env's observation box, and an unbounded one is true of
  every kalm dataset (the workbench is ``spec.state_low/state_high``).

d3rlpy users: d3rlpy 2.8's ``datasets.get_minari`` pairs each episode's T+1
observations with its T actions (every later episode shifted) and infers the number of
discrete actions from the largest one seen; read the dataset with :func:`import_minari`
and build the buffer with :func:`kalm.offline.buffers.build_replay_buffer` instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

from kalm.data.episodes import ActionCheck, DatasetError, Episode, EpisodeDataset, load_episodes
from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec, TaskSpecError

KALM_METADATA_KEY = "kalm"
LAYOUT_VERSION = 1
EPISODE_FIELDS = ("instruction", "task")
_ROOT_VARIABLE = "MINARI_DATASETS_PATH"


@contextlib.contextmanager
def _datasets_root(root: str | os.PathLike | None) -> Iterator[None]:
    """Point minari at ``root`` for the duration: minari 0.5 takes its datasets
    directory only from ``$MINARI_DATASETS_PATH``, read on every call. Not thread-safe,
    since the process environment is shared."""
    if root is None:
        yield
        return
    previous = os.environ.get(_ROOT_VARIABLE)
    # absolute, so the returned dataset keeps working after the variable is restored
    os.environ[_ROOT_VARIABLE] = str(Path(root).resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_ROOT_VARIABLE, None)
        else:
            os.environ[_ROOT_VARIABLE] = previous


def _check_dataset_id(dataset_id: str) -> None:
    """Refuse a malformed id before anything is deleted or written (minari itself
    fails on a missing version with a bare ``TypeError`` from ``int(None)``)."""
    try:
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed Minari dataset id {dataset_id!r}: expected NAMESPACE/NAME-vN") from exc


def _episode_buffer(episode: Episode) -> EpisodeBuffer:
    """A kalm episode ends at its first termination or truncation, so only the last
    step carries the flags in Minari's per-step arrays."""
    terminations = np.zeros(episode.length, dtype=bool)
    truncations = np.zeros(episode.length, dtype=bool)
    terminations[-1], truncations[-1] = episode.terminated, episode.truncated
    # empty infos rather than none: minari 0.5.4's EpisodeData.__repr__ fails on None
    return EpisodeBuffer(observations=episode.observations, actions=episode.actions, rewards=episode.rewards,
                         terminations=terminations, truncations=truncations, infos={})


def export_minari(
    dataset: EpisodeDataset | str | os.PathLike,
    dataset_id: str,
    *,
    author: str | None = None,
    description: str | None = None,
    root: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> minari.MinariDataset:
    """Write ``dataset`` (or the episode file at that path) as the Minari dataset
    ``dataset_id`` under ``root``; see the module docstring for the layout.

    An existing dataset with that id is refused unless ``overwrite`` (it is then deleted
    before the new one is written). A failed write removes its partial folder, so the id
    never names half a dataset.
    """
    if not isinstance(dataset, EpisodeDataset):
        dataset = load_episodes(dataset)
    _check_dataset_id(dataset_id)
    spec = get_spec(dataset.env)
    buffers = [_episode_buffer(ep) for ep in dataset.episodes]
    with _datasets_root(root):
        target = get_dataset_path(dataset_id)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"Minari dataset {dataset_id!r} already exists at {target} "
                                      "(pass overwrite=True / --overwrite to replace it)")
            with contextlib.redirect_stdout(io.StringIO()):  # delete_dataset prints a line
                minari.delete_dataset(dataset_id)
        try:
            return _write(dataset, dataset_id, buffers, spec, author, description)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise


def _write(dataset: EpisodeDataset, dataset_id: str, buffers: list[EpisodeBuffer], spec: EnvSpec,
           author: str | None, description: str | None) -> minari.MinariDataset:
    env = spec.make_env()  # minari records the spec of an env made by gym.make
    try:
        with warnings.catch_warnings():
            # minari warns about every optional field left empty (permalink, e-mail ...)
            warnings.filterwarnings("ignore", message=r"`\w+` is set to None", category=UserWarning)
            created = minari.create_dataset_from_buffers(
                dataset_id, buffers, env=env, eval_env=env.spec,
                algorithm_name=f"kalm {dataset.metadata.get('source', 'episodes')}",
                author=author,
                description=description or f"kalm {dataset.env} episodes; each episode's instruction and task "
                                           "are in its episode metadata, kalm's dataset metadata under 'kalm'",
                observation_space=gym.spaces.Box(-np.inf, np.inf, (spec.state_dim,), np.float32),
                action_space=spec.action_space,
                data_format="hdf5",
            )
    finally:
        env.close()
    created.storage.update_episode_metadata(
        [{"instruction": ep.instruction, "task": json.dumps(ep.task, sort_keys=True, allow_nan=False)}
         for ep in dataset.episodes]
    )
    created.storage.update_metadata(
        {KALM_METADATA_KEY: {"env": dataset.env, "layout_version": LAYOUT_VERSION, "metadata": dataset.metadata}}
    )
    return created


def import_minari(dataset_id: str, *, root: str | os.PathLike | None = None) -> EpisodeDataset:
    """Read the Minari dataset ``dataset_id`` (written by :func:`export_minari`) back
    into kalm episodes, validated like an episode file: each episode through
    :class:`Episode`, its states and actions against the env's spec, and its task
    with ``spec.parse_task``. Anything else is refused with a :class:`DatasetError`
    naming the dataset and what is wrong or missing."""
    _check_dataset_id(dataset_id)
    if root is not None and not Path(root).is_dir():
        raise DatasetError(f"no Minari dataset {dataset_id!r}: {root} is not a directory")
    with _datasets_root(root):
        location = get_dataset_path(dataset_id)
        if not location.joinpath("data").is_dir():
            raise DatasetError(f"no Minari dataset {dataset_id!r} (looked in {location})")
        try:
            return _read(minari.load_dataset(dataset_id), f"Minari dataset {dataset_id!r}")
        except DatasetError:
            raise
        except (OSError, KeyError, ValueError, TypeError, AssertionError) as exc:
            # minari checks its metadata with asserts and reads HDF5 through h5py, whose
            # errors for a damaged file come from wherever it is first touched
            raise DatasetError(f"Minari dataset {dataset_id!r} cannot be read ({type(exc).__name__}: {exc})") from exc


def _read(source: minari.MinariDataset, where: str) -> EpisodeDataset:
    info = source.storage.metadata.get(KALM_METADATA_KEY)
    if not isinstance(info, Mapping) or not isinstance(info.get("env"), str) or "metadata" not in info:
        raise DatasetError(f"{where} was not written by kalm: its metadata lacks the '{KALM_METADATA_KEY}' entry "
                           "(env name and kalm metadata) that export_minari writes")
    if info.get("layout_version") != LAYOUT_VERSION:
        raise DatasetError(f"{where}: kalm layout version {info.get('layout_version')!r} "
                           f"is not {LAYOUT_VERSION}, the one this kalm reads")
    try:
        spec = get_spec(info["env"])
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from exc
    fields = list(source.storage.get_episode_metadata(source.episode_indices))
    check = ActionCheck.from_space(spec.action_space)
    episodes = tuple(_kalm_episode(data, extra, spec, check, f"{where}, episode {data.id}")
                     for data, extra in zip(source.iterate_episodes(), fields))
    return EpisodeDataset(env=info["env"], episodes=episodes, metadata=info["metadata"])


def _kalm_episode(data: minari.EpisodeData, extra: Mapping[str, Any], spec: EnvSpec, check: ActionCheck,
                  where: str) -> Episode:
    missing = [name for name in EPISODE_FIELDS if not isinstance(extra.get(name), str)]
    if missing:
        raise DatasetError(f"{where}: no kalm episode metadata {' or '.join(map(repr, missing))} "
                           "(the instruction text and task JSON that export_minari writes)")
    terminations, truncations = np.asarray(data.terminations, bool), np.asarray(data.truncations, bool)
    if terminations[:-1].any() or truncations[:-1].any():
        raise DatasetError(f"{where}: terminates or truncates before its last step; a kalm episode ends there")
    try:
        task = json.loads(extra["task"], parse_constant=_refuse_constant)
        spec.parse_task(task)
        episode = Episode(observations=data.observations, actions=data.actions, rewards=data.rewards,
                          terminated=bool(terminations[-1]), truncated=bool(truncations[-1]),
                          instruction=extra["instruction"], task=task)
    except (ValueError, TaskSpecError) as exc:  # DatasetError and JSON errors are ValueErrors too
        raise DatasetError(f"{where}: {exc}") from exc
    _check_against_spec(episode, spec, check, where)
    return episode


def _refuse_constant(name: str) -> float:
    raise ValueError(f"task JSON holds {name}, which is not JSON")


def _check_against_spec(episode: Episode, spec: EnvSpec, check: ActionCheck, where: str) -> None:
    """What ``load_episodes`` checks beyond the Episode constructor: states of the env's
    size and actions inside its action space."""
    if episode.state_dim != spec.state_dim:
        raise DatasetError(f"{where}: states have {episode.state_dim} values, env {spec.name!r} has {spec.state_dim}")
    actions = episode.actions
    if check.discrete:
        inside = actions.ndim == 1 and bool(np.all((actions >= 0) & (actions < check.n)))
    else:
        inside = actions.shape[1:] == check.shape and bool(
            np.all((actions >= check.low - 1e-6) & (actions <= check.high + 1e-6)))
    if not inside:
        raise DatasetError(f"{where}: actions of shape {actions.shape} are outside the action space "
                           f"{spec.action_space} of env {spec.name!r}")
