"""Real episodes from the scripted expert: the "offline data" every method starts from.

Any episode source that follows :class:`EpisodeSource` (this expert, or the hindsight
labeller in :mod:`kalm.data.hindsight`) is written the same checkpointed way.

Episode ``i`` depends only on ``(seed, i)``: its goal is training task ``i mod n_tasks``
(so every goal gets episodes), and its start state, phrasing and the expert's random
pushes come from a generator seeded with ``[seed, i]``. A collection can therefore be
cut into chunks, killed and resumed, and still give exactly the same dataset.

Long runs write finished chunks as shard files into ``<out>.partial/`` and assemble
the final file only when every episode exists, so a killed run never leaves a file at
``out`` that looks complete; running the same command again continues from the shards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from kalm.data.episodes import DatasetError, Episode, EpisodeDataset, load_episodes, save_episodes
from kalm.envs.spec import EnvSpec
from kalm.files import make_dirs, raise_naming
from kalm.parallel import process_group, shard, wait_for_everyone


class EpisodeSource(Protocol):
    """A frozen config that can make episode ``index`` of its collection on its own.

    ``make_episode`` must depend only on the config and ``index`` (not on which episodes
    were made before in the same env), so a collection can be cut into shards, killed
    and resumed and still give the same file.
    """

    episodes: int
    chunk_size: int

    def check(self, spec: EnvSpec) -> None: ...

    def make_episode(self, spec: EnvSpec, env, index: int) -> Episode: ...

    def metadata(self, spec: EnvSpec) -> dict: ...


@dataclass(frozen=True)
class CollectConfig:
    """How to collect expert data.

    Attributes:
        episodes: number of episodes.
        seed: the collection's seed; episode ``i`` is seeded with ``[seed, i]``.
        epsilon: share of uniformly random actions the expert takes (diversity).
        reward: name of the reward in ``spec.rewards`` used to label transitions.
        chunk_size: episodes per shard when writing to a file (checkpoint granularity).
    """

    episodes: int = 800
    seed: int = 0
    epsilon: float = 0.0
    reward: str = "sparse"
    chunk_size: int = 200

    def check(self, spec: EnvSpec) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if self.reward not in spec.rewards:
            raise ValueError(f"unknown reward {self.reward!r} (available: {', '.join(sorted(spec.rewards))})")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def make_episode(self, spec: EnvSpec, env, index: int) -> Episode:
        return collect_episode(spec, env, index, self)

    def metadata(self, spec: EnvSpec) -> dict:
        return {
            "source": "expert",
            "env": spec.name,
            "episodes": self.episodes,
            "seed": self.seed,
            "epsilon": self.epsilon,
            "reward": self.reward,
            "tasks": "training",
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


_MAX_START_TRIES = 100


def collect_episode(spec: EnvSpec, env, index: int, config: CollectConfig) -> Episode:
    """Roll out the expert for episode ``index`` of a collection."""
    tasks = spec.training_tasks()
    task = tasks[index % len(tasks)]
    rng = np.random.default_rng([config.seed, index])
    expert = spec.make_expert(env, epsilon=config.epsilon, seed=int(rng.integers(2**63)))
    reward_fn = spec.rewards[config.reward]
    # A start where the goal already holds teaches nothing: draw another one.
    for _ in range(_MAX_START_TRIES):
        obs, _ = env.reset(seed=int(rng.integers(2**31)), options={"task": task})
        start = np.array(env.unwrapped.start_state, dtype=np.float32)
        if not task.success(start, start):
            break
    observations, actions, rewards = [np.asarray(obs, dtype=np.float32)], [], []
    terminated = truncated = False
    for _ in range(spec.max_episode_steps):
        action = expert(obs, task, start)
        state = observations[-1]
        obs, _, _, env_truncated, _ = env.step(action)
        next_state = np.asarray(obs, dtype=np.float32)
        observations.append(next_state)
        actions.append(action)
        rewards.append(reward_fn(task, state, next_state, start))
        terminated = bool(task.success(next_state, start))
        truncated = bool(env_truncated) or len(actions) >= spec.max_episode_steps
        if terminated or truncated:
            break
    return Episode(
        observations=np.stack(observations),
        actions=np.asarray(actions),
        rewards=np.asarray(rewards, dtype=np.float32),
        terminated=terminated,
        truncated=truncated and not terminated,
        instruction=spec.training_instruction(task, rng),
        task=task.to_json(),
    )


def collect_range(spec: EnvSpec, config: EpisodeSource, start: int, stop: int, progress=None) -> list[Episode]:
    """Episodes ``start .. stop-1`` of the collection described by ``config``."""
    env = spec.make_env()
    try:
        episodes = []
        for i in range(start, stop):
            episodes.append(config.make_episode(spec, env, i))
            if progress is not None:
                progress.update(1)
        return episodes
    finally:
        env.close()


def collect_expert(
    spec: EnvSpec,
    episodes: int = CollectConfig.episodes,
    seed: int = CollectConfig.seed,
    epsilon: float = CollectConfig.epsilon,
    reward: str = CollectConfig.reward,
    progress: bool = True,
) -> EpisodeDataset:
    """Collect expert episodes in memory (see :func:`collect_to_file` for long runs)."""
    config = CollectConfig(episodes=episodes, seed=seed, epsilon=epsilon, reward=reward)
    config.check(spec)
    with tqdm(total=episodes, desc=f"collect {spec.name}", unit="ep", disable=not progress) as bar:
        eps = collect_range(spec, config, 0, episodes, bar)
    return EpisodeDataset(env=spec.name, episodes=tuple(eps), metadata=config.metadata(spec))


def partial_dir(out: Path) -> Path:
    """Where the shards of an unfinished collection into ``out`` live."""
    return out.with_name(out.name + ".partial")


def _shard_path(directory: Path, chunk: int) -> Path:
    return directory / f"shard-{chunk:05d}.h5"


def _start_or_resume(spec: EnvSpec, config: EpisodeSource, directory: Path) -> None:
    """Create the shard directory, or check that an existing one belongs to the same
    collection (resuming with other settings would mix two datasets)."""
    wanted = {"env": spec.name, **asdict(config)}
    config_file = directory / "config.json"
    if directory.exists():
        try:
            found = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{directory}: unfinished collection without a readable config.json ({exc}); "
                               "delete the directory to start over") from exc
        if found != wanted:
            raise DatasetError(
                f"{directory}: an unfinished collection with other settings is in the way "
                f"({json.dumps(found, sort_keys=True)} vs {json.dumps(wanted, sort_keys=True)}); "
                "delete it or use the same settings to resume"
            )
        return
    make_dirs(directory.parent)
    directory.mkdir()
    tmp = config_file.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(wanted, sort_keys=True))
        tmp.replace(config_file)
    except OSError as exc:  # e.g. a full disk: a shard directory without its config would block every rerun
        shutil.rmtree(directory, ignore_errors=True)
        raise_naming(exc, config_file)


def _collect_shard(env: str, config: EpisodeSource, directory: Path, chunk: int, start: int, stop: int) -> int:
    """One chunk collected and saved as its shard, in a worker process (top-level so
    that a spawned process can run it); returns its episode count."""
    from kalm.envs import get_spec

    spec = get_spec(env)
    episodes = tuple(collect_range(spec, config, start, stop))
    save_episodes(EpisodeDataset(spec.name, episodes, {"shard": chunk, **asdict(config)}),
                  _shard_path(directory, chunk))
    return len(episodes)


def _collect_shards_in_workers(spec: EnvSpec, config: EpisodeSource, directory: Path,
                               chunks: dict[int, tuple[int, int]], workers: int, bar) -> None:
    """Collect ``chunks`` (chunk -> episode bounds) in ``workers`` spawned processes.

    Why: an episode is a single-threaded simulator loop, so on a machine with idle cores
    a collection runs that many times faster; each chunk is seeded by its episodes'
    indices and written as its own shard, so the file is the one-process file."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_collect_shard, spec.name, config, directory, chunk, *bounds)
                   for chunk, bounds in chunks.items()]
        for future in as_completed(futures):
            bar.update(future.result())


def collect_to_file(spec: EnvSpec, config: EpisodeSource, out: str | Path, progress: bool = True,
                    desc: str | None = None, workers: int = 1) -> EpisodeDataset:
    """Collect into ``out`` in checkpointed chunks, resuming an interrupted run.

    Finished chunks are saved (atomically) as shards in ``<out>.partial/``; existing
    shards are validated and reused. The final file is assembled from the shards and
    written atomically, then the shard directory is removed. ``workers`` > 1 collects
    the missing chunks in that many processes (the environment must be one that
    :func:`kalm.envs.get_spec` finds by name in a fresh process); the file is the same.
    """
    config.check(spec)
    out = Path(out)
    directory = partial_dir(out)
    index, count = process_group()
    if index == 0:
        _start_or_resume(spec, config, directory)
    wait_for_everyone()
    n_chunks = -(-config.episodes // config.chunk_size)

    def bounds(chunk: int) -> tuple[int, int]:
        return chunk * config.chunk_size, min((chunk + 1) * config.chunk_size, config.episodes)

    def load_shard(chunk: int) -> tuple[Episode, ...]:
        path, (start, stop) = _shard_path(directory, chunk), bounds(chunk)
        done = load_episodes(path, spec).episodes
        if len(done) != stop - start:
            raise DatasetError(f"{path}: holds {len(done)} episodes, expected {stop - start}")
        return done

    # Under `accelerate launch` process r collects chunks r, r + N, ...: each chunk's
    # episodes are seeded by their index, so the file is the one-process file.
    mine = shard(range(n_chunks), index, count)
    collected: dict[int, tuple[Episode, ...]] = {}
    total = sum(stop - start for start, stop in map(bounds, mine))
    with tqdm(total=total, desc=desc or f"collect {spec.name}", unit="ep", disable=not progress or index) as bar:
        missing = {chunk: bounds(chunk) for chunk in mine if not _shard_path(directory, chunk).exists()}
        by_workers = count == 1 and workers > 1 and len(missing) > 1
        if by_workers:
            _collect_shards_in_workers(spec, config, directory, missing, min(workers, len(missing)), bar)
        for chunk in mine:
            if _shard_path(directory, chunk).exists():
                collected[chunk] = load_shard(chunk)
                if not (by_workers and chunk in missing):  # the workers counted theirs
                    bar.update(len(collected[chunk]))
            else:
                collected[chunk] = tuple(collect_range(spec, config, *bounds(chunk), bar))
                save_episodes(EpisodeDataset(spec.name, collected[chunk], {"shard": chunk, **asdict(config)}),
                              _shard_path(directory, chunk))
    wait_for_everyone()
    if index == 0:
        episodes = [e for chunk in range(n_chunks) for e in (collected.get(chunk) or load_shard(chunk))]
        dataset = EpisodeDataset(env=spec.name, episodes=tuple(episodes), metadata=config.metadata(spec))
        save_episodes(dataset, out)
        shutil.rmtree(directory)
    wait_for_everyone()
    if index > 0:
        dataset = load_episodes(out, spec)
    wait_for_everyone()  # the caller may move `out` (a stage renames its directory) once all have read it
    return dataset
