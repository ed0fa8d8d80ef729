"""Convert the original KALM CLEVR-Robot data (padded arrays, 6-d goal vectors) into
kalm episodes, so that the published toy set can be compared with our own data.

The source layout (kalm-reference §3.2): ``observations`` / ``next_observations``
(N, T, 10), ``actions`` (N, T), ``rewards`` (N, T[, 1]), ``terminals`` (N, T[, 1]),
``masks`` (N, T) with 1 on valid steps, ``goals`` (N, 6) or (N, T, 6) and
``instructions`` (N, K). A goal is five role marks (1 = the object to move,
2 = the anchor, 0 = other) followed by a direction (0 behind, 1 left, 2 front,
3 right). The file is read with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kalm.data.episodes import DatasetError, Episode, EpisodeDataset, success_disagreements
from kalm.envs.clevr.tasks import COLOURS, Relation
from kalm.envs.spec import EnvSpec

GOAL_DIRECTIONS = ("behind", "left", "front", "right")
_REQUIRED = ("observations", "next_observations", "actions", "rewards", "terminals", "masks", "goals", "instructions")


@dataclass(frozen=True)
class ImportReport:
    """What the import found: the dataset plus how well the source's own labels agree
    with our task predicates, rewards and instruction parser."""

    dataset: EpisodeDataset
    success_disagreements: list[int] = field(default_factory=list)
    instruction_disagreements: list[int] = field(default_factory=list)
    shaped_reward_max_error: float = float("nan")

    def summary(self) -> str:
        n = len(self.dataset)
        lines = [
            f"imported {n} episodes, {self.dataset.n_transitions} transitions, "
            f"success rate {self.dataset.success_rate:.3f}",
            f"terminal flags agreeing with our task predicates on the last state: "
            f"{n - len(self.success_disagreements)}/{n}"
            + (f" (disagree: {self.success_disagreements[:10]})" if self.success_disagreements else ""),
            f"instructions read back to the goal vector's task: {n - len(self.instruction_disagreements)}/{n}"
            + (f" (disagree: {self.instruction_disagreements[:10]})" if self.instruction_disagreements else ""),
            f"max |source reward - our 'shaped' reward|: {self.shaped_reward_max_error:.2e}",
        ]
        return "\n".join(lines)


def goal_to_task(goal: np.ndarray, where: str) -> Relation:
    """A 6-d KALM goal vector -> our relation task, refusing anything malformed."""
    goal = np.asarray(goal, dtype=np.float64)
    if goal.shape != (6,):
        raise DatasetError(f"{where}: goal must have 6 entries, got shape {goal.shape}")
    if not np.all(np.isfinite(goal)) or not np.all(goal == np.round(goal)):
        raise DatasetError(f"{where}: goal entries must be whole numbers, got {goal.tolist()}")
    marks, direction = goal[:5].astype(int), int(goal[5])
    if not set(marks.tolist()) <= {0, 1, 2}:
        raise DatasetError(f"{where}: role marks must be 0, 1 (object) or 2 (anchor), got {marks.tolist()}")
    if (marks == 1).sum() != 1 or (marks == 2).sum() != 1:
        raise DatasetError(f"{where}: role marks need exactly one object (1) and one anchor (2), got {marks.tolist()}")
    if direction not in range(len(GOAL_DIRECTIONS)):
        raise DatasetError(f"{where}: direction must be 0 behind, 1 left, 2 front or 3 right, got {direction}")
    obj, anchor = COLOURS[int(np.argmax(marks == 1))], COLOURS[int(np.argmax(marks == 2))]
    return Relation(obj, anchor, GOAL_DIRECTIONS[direction])


def _load_npz(src: Path) -> dict[str, np.ndarray]:
    if not src.exists():
        raise DatasetError(f"{src}: no such file")
    if not zipfile.is_zipfile(src):
        raise DatasetError(f"{src}: not an .npz archive (not a zip file)")
    try:
        with np.load(src, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DatasetError(f"{src}: expected an .npz archive of named arrays")
            missing = [k for k in _REQUIRED if k not in data.files]
            if missing:
                raise DatasetError(f"{src}: missing array(s) {', '.join(map(repr, missing))} (found {data.files})")
            return {k: data[k] for k in _REQUIRED}
    except DatasetError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{src}: cannot read as a pickle-free .npz archive ({exc})") from exc


def _squeeze_last(array: np.ndarray, name: str, shape: tuple[int, int], src: Path) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.shape != shape:
        raise DatasetError(f"{src}: array '{name}' has shape {array.shape}, expected {shape}")
    return array


def import_kalm_clevr(src: str | Path, spec: EnvSpec, instruction_seed: int = 0) -> ImportReport:
    """Read an original KALM CLEVR file into an :class:`EpisodeDataset`.

    Each episode keeps the source's rewards and terminal flags; its instruction is one
    of the source's phrasings for that goal, drawn with ``instruction_seed``. The report
    compares the source's labels with our predicates, rewards and instruction parser.
    """
    src = Path(src)
    source = _read_source(src, spec)
    rng = np.random.default_rng(instruction_seed)
    episodes, instruction_bad, reward_errors = [], [], []
    shaped = spec.rewards.get("shaped")
    for i in range(len(source.observations)):
        episode, reads_back, reward_error = _convert_episode(source, i, spec, shaped, rng)
        if not reads_back:
            instruction_bad.append(i)
        if reward_error is not None:
            reward_errors.append(reward_error)
        episodes.append(episode)
    metadata = {
        "source": "import",
        "format": "kalm-original-clevr",
        "src": str(src),
        "reward": "source",
        "instruction_seed": instruction_seed,
    }
    dataset = EpisodeDataset(env=spec.name, episodes=tuple(episodes), metadata=metadata)
    return ImportReport(
        dataset=dataset,
        success_disagreements=success_disagreements(dataset, spec),
        instruction_disagreements=instruction_bad,
        shaped_reward_max_error=max(reward_errors) if reward_errors else float("nan"),
    )


@dataclass(frozen=True)
class _Source:
    """The source file's arrays once their shapes agree: ``N`` episodes padded to
    ``T`` steps (``masks`` marks the valid ones), one goal and ``K`` phrasings each."""

    path: Path
    observations: np.ndarray  # (N, T, state_dim)
    next_observations: np.ndarray  # (N, T, state_dim)
    actions: np.ndarray  # (N, T)
    rewards: np.ndarray  # (N, T)
    terminals: np.ndarray  # (N, T) bool
    masks: np.ndarray  # (N, T) bool
    goals: np.ndarray  # (N, 6)
    texts: np.ndarray  # (N, K) str


def _read_source(src: Path, spec: EnvSpec) -> _Source:
    a = _load_npz(src)
    obs = a["observations"]
    if obs.ndim != 3 or obs.shape[2] != spec.state_dim:
        raise DatasetError(f"{src}: array 'observations' has shape {obs.shape}, expected (N, T, {spec.state_dim})")
    n, horizon = obs.shape[:2]
    if a["next_observations"].shape != obs.shape:
        raise DatasetError(f"{src}: array 'next_observations' has shape {a['next_observations'].shape}, "
                           f"expected {obs.shape}")
    for name in ("observations", "next_observations", "rewards"):
        if not np.issubdtype(a[name].dtype, np.number) or not np.all(np.isfinite(a[name])):
            raise DatasetError(f"{src}: array '{name}' must hold finite numbers")
    actions = _squeeze_last(a["actions"], "actions", (n, horizon), src)
    rewards = _squeeze_last(a["rewards"], "rewards", (n, horizon), src)
    terminals = _squeeze_last(a["terminals"], "terminals", (n, horizon), src).astype(bool)
    masks = _squeeze_last(a["masks"], "masks", (n, horizon), src).astype(bool)
    goals = a["goals"]
    if goals.ndim == 3:
        goals = goals[:, 0, :]
    if goals.shape[0] != n:
        raise DatasetError(f"{src}: array 'goals' has {goals.shape[0]} rows for {n} episodes")
    texts = a["instructions"]
    if texts.ndim == 1:
        texts = texts[:, None]
    if texts.shape[0] != n or texts.dtype.kind != "U":
        raise DatasetError(f"{src}: array 'instructions' must be (N, K) strings, got {texts.shape} {texts.dtype}")
    return _Source(src, obs, a["next_observations"], actions, rewards, terminals, masks, goals, texts)


def _convert_episode(
    source: _Source, i: int, spec: EnvSpec, shaped: Callable | None, rng: np.random.Generator
) -> tuple[Episode, bool, float | None]:
    """Episode ``i`` as ours; whether the source's first phrasing of it reads back as
    its goal's task; and the largest gap between its rewards and our ``shaped`` reward
    (``None`` where the env has no shaped reward)."""
    src = source.path
    task = goal_to_task(source.goals[i], f"{src}: goals[{i}]")
    states, actions = _unpadded(source, i, spec)
    length = len(actions)
    phrasings = [t for t in source.texts[i] if t]
    if not phrasings:
        raise DatasetError(f"{src}: instructions[{i}] holds no text")
    reads_back = spec.parse_instruction(phrasings[0]) == task
    reward_error = None
    if shaped is not None:
        ours = [shaped(task, states[t], states[t + 1], states[0]) for t in range(length)]
        reward_error = float(np.max(np.abs(np.asarray(ours) - source.rewards[i, :length])))
    terminated = bool(source.terminals[i, length - 1])
    episode = Episode(
        observations=states,
        actions=actions,
        rewards=source.rewards[i, :length],
        terminated=terminated,
        truncated=not terminated and length >= spec.max_episode_steps,
        instruction=str(phrasings[int(rng.integers(len(phrasings)))]),
        task=task.to_json(),
    )
    return episode, reads_back, reward_error


def _unpadded(source: _Source, i: int, spec: EnvSpec) -> tuple[np.ndarray, np.ndarray]:
    """Episode ``i``'s valid steps: its T + 1 states and T actions."""
    src, masks = source.path, source.masks
    length = int(masks[i].sum())
    if length < 1 or not masks[i, :length].all():
        raise DatasetError(f"{src}: masks[{i}] must be a run of 1s from the start followed by 0s")
    actions = source.actions[i, :length]
    if not np.issubdtype(actions.dtype, np.integer) or actions.min() < 0 or actions.max() >= spec.action_dim:
        raise DatasetError(f"{src}: actions[{i}] must be integers in [0, {spec.action_dim})")
    obs, next_obs = source.observations, source.next_observations
    states = np.concatenate([obs[i, :length], next_obs[i, length - 1 : length]])
    if not np.allclose(obs[i, 1:length], next_obs[i, : length - 1], atol=1e-5):
        raise DatasetError(f"{src}: episode {i}: next_observations[t] differs from observations[t+1]")
    return states, actions
