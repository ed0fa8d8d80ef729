"""Episodes -> d3rlpy replay buffers -> mini-batches mixing real and imaginary data.

Policy observations are ``state ⊕ instruction embedding`` (KALM §3.3): the embedding is
constant within an episode and appended to every state, including the final one.

Terminal semantics (the reference got this wrong, kalm-reference §9.6):
- a *terminated* episode (the task succeeded) ends with ``terminal = 1``: its last
  transition does not bootstrap;
- a *truncated* episode (the horizon ran out) is a timeout: its last transition has
  ``terminal = 0`` and bootstraps from the final state with the configured discount.

d3rlpy's ``Episode`` stores as many observations as actions and, for a non-terminated
episode, drops the last transition (it has no next observation). To keep all T
transitions of a timeout we hand d3rlpy the T + 1 states with one padding action and
reward after the last real one; d3rlpy then counts exactly T transitions, the last of
which bootstraps from state T. A terminated episode is handed over with its T states
before the end, and d3rlpy zeroes the next state of its terminal transition.

Sampling: each batch takes ``round(imaginary_ratio * batch_size)`` transitions from
the imaginary episodes and the rest from the real ones, each uniformly over its own
transitions. ImagineBench instead pooled everything in one buffer, so the real to
imaginary mix followed the datasets' sizes rather than the 1:1 the paper states; a
fixed per-batch split makes the ratio a setting that means the same thing whatever the
dataset sizes. With several imaginary sources (one file per imagined level) the
imaginary share is either drawn uniformly over all their transitions (``pooled``) or
split evenly between the sources (``per_source``): pooled, a level with many short
rollouts crowds out one with few, so adding rollouts for one level silently takes
batch share from the others. Transitions are read out of the d3rlpy buffers once into
flat arrays (d3rlpy's own per-transition sampling costs a third of a training step)
and sampled with a seeded NumPy generator whose state goes into checkpoints, so a
resumed run draws the same batches it would have drawn.

Sequence models (the Decision Transformer) learn from slices of episodes instead:
:class:`TrajectorySampler` draws each slice's last step uniformly over the transitions
of its source, exactly as d3rlpy's ``sample_trajectory`` does, with the same shares
and the same seeded generator. Their episodes carry no padding step: a sequence model
is trained to act in every state it is shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import d3rlpy
import numpy as np

from kalm.data.episodes import Episode, EpisodeDataset
from kalm.envs.spec import EnvSpec

RewardFn = Callable[[Episode], np.ndarray]


def relabel_rewards(spec: EnvSpec, reward: str) -> RewardFn:
    """Per-transition rewards of an episode recomputed with one of ``spec.rewards``.

    Lets one dataset be trained with either reward (the choice of reward is an
    offline-RL setting, not a property of the collected states and actions).
    """
    if reward not in spec.rewards:
        raise ValueError(f"unknown reward {reward!r} for {spec.name} (available: {', '.join(sorted(spec.rewards))})")
    fn = spec.rewards[reward]
    tasks: dict[str, object] = {}

    def label(episode: Episode) -> np.ndarray:
        key = json.dumps(episode.task, sort_keys=True)
        if key not in tasks:
            tasks[key] = spec.parse_task(episode.task)
        task = tasks[key]
        obs = episode.observations
        start = obs[0]
        return np.array([fn(task, obs[t], obs[t + 1], start) for t in range(episode.length)], dtype=np.float32)

    return label


def stored_rewards(episode: Episode) -> np.ndarray:
    return np.asarray(episode.rewards, dtype=np.float32)


def to_d3rlpy_episode(
    episode: Episode, embedding: np.ndarray, rewards: np.ndarray, discrete: bool, sequence: bool = False
) -> d3rlpy.dataset.Episode:
    """One kalm episode as a d3rlpy episode with ``state ⊕ embedding`` observations
    (``sequence``: the T states in which an action was taken, no padding step)."""
    states = np.asarray(episode.observations, dtype=np.float32)
    observations = np.concatenate([states, np.broadcast_to(embedding, (len(states), len(embedding)))], axis=1)
    actions = np.asarray(episode.actions)
    actions = actions.reshape(-1, 1).astype(np.int64) if discrete else actions.astype(np.float32)
    rewards = np.asarray(rewards, dtype=np.float32).reshape(-1, 1)
    if episode.terminated or sequence:
        observations = observations[:-1]
    else:
        actions = np.concatenate([actions, np.zeros_like(actions[:1])])
        rewards = np.concatenate([rewards, np.zeros_like(rewards[:1])])
    return d3rlpy.dataset.Episode(
        observations=observations, actions=actions, rewards=rewards, terminated=bool(episode.terminated)
    )


def build_replay_buffer(
    dataset: EpisodeDataset,
    spec: EnvSpec,
    embed: Callable[[Sequence[str]], np.ndarray],
    reward_fn: RewardFn = stored_rewards,
    sequence: bool = False,
) -> d3rlpy.dataset.ReplayBuffer:
    """A d3rlpy replay buffer of the dataset, with ``action_size`` taken from the spec.

    d3rlpy infers the number of discrete actions from the largest action present; a
    dataset in which the last actions never occur would otherwise build a policy that
    can never take them.
    """
    if dataset.env != spec.name:
        raise ValueError(f"dataset is for environment {dataset.env!r}, not {spec.name!r}")
    instructions = sorted({ep.instruction for ep in dataset.episodes})
    vectors = dict(zip(instructions, embed(instructions)))
    episodes = [
        to_d3rlpy_episode(ep, vectors[ep.instruction], reward_fn(ep), spec.discrete, sequence)
        for ep in dataset.episodes
    ]
    action_space = d3rlpy.constants.ActionSpace.DISCRETE if spec.discrete else d3rlpy.constants.ActionSpace.CONTINUOUS
    first = episodes[0]
    signature = d3rlpy.dataset.Signature
    return d3rlpy.dataset.ReplayBuffer(
        d3rlpy.dataset.InfiniteBuffer(),
        episodes=episodes,
        observation_signature=signature(dtype=[np.float32], shape=[first.observations.shape[1:]]),
        action_signature=signature(dtype=[first.actions.dtype], shape=[first.actions.shape[1:]]),
        reward_signature=signature(dtype=[np.float32], shape=[(1,)]),
        action_space=action_space,
        action_size=spec.action_dim,
    )


@dataclass(frozen=True)
class TransitionTable:
    """Every transition of a replay buffer as flat arrays (what a mini-batch needs)."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    next_actions: np.ndarray
    terminals: np.ndarray

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @classmethod
    def from_replay_buffer(cls, buffer: d3rlpy.dataset.ReplayBuffer) -> TransitionTable:
        """Read each transition through d3rlpy's own transition picker, so terminals,
        zeroed terminal next-states and next actions are exactly d3rlpy's."""
        picker = d3rlpy.dataset.BasicTransitionPicker()
        transitions = [picker(ep, i) for ep in buffer.episodes for i in range(ep.transition_count)]
        if not transitions:
            raise ValueError("the dataset holds no transitions")
        return cls(
            observations=np.stack([t.observation for t in transitions]).astype(np.float32),
            actions=np.stack([t.action for t in transitions]).astype(np.float32),
            rewards=np.stack([t.reward for t in transitions]).astype(np.float32).reshape(-1, 1),
            next_observations=np.stack([t.next_observation for t in transitions]).astype(np.float32),
            next_actions=np.stack([t.next_action for t in transitions]).astype(np.float32),
            terminals=np.array([t.terminal for t in transitions], dtype=np.float32).reshape(-1, 1),
        )

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "observations": self.observations[index],
            "actions": self.actions[index],
            "rewards": self.rewards[index],
            "next_observations": self.next_observations[index],
            "next_actions": self.next_actions[index],
            "terminals": self.terminals[index],
        }


class _Shares:
    """How many slots of every batch go to the real data and to each imaginary source.

    The imaginary share is ``round(imaginary_ratio * batch_size)``; with several
    sources each gets ``n_imaginary // len(sources)`` slots and the remainder goes to
    sources drawn at random, one slot each.
    """

    def __init__(self, n_sources: int, batch_size: int, imaginary_ratio: float):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= imaginary_ratio <= 1.0:
            raise ValueError(f"imaginary_ratio must be in [0, 1], got {imaginary_ratio}")
        if not n_sources:
            imaginary_ratio = 0.0
        self.n_sources = n_sources
        self.n_imaginary = round(imaginary_ratio * batch_size)
        self.n_real = batch_size - self.n_imaginary

    def imaginary_counts(self, rng: np.random.Generator) -> np.ndarray:
        k = self.n_sources
        counts = np.full(k, self.n_imaginary // k if k else 0)
        if k and self.n_imaginary % k:  # never with one source, whose batches stay what they were
            counts[rng.choice(k, size=self.n_imaginary % k, replace=False)] += 1
        return counts


class MixedSampler(_Shares):
    """Mini-batches of transitions with a fixed share of imaginary ones (see the module
    docstring). ``imaginary`` is one table (pooled) or a sequence of tables whose share
    is split evenly."""

    def __init__(
        self,
        real: TransitionTable,
        imaginary: TransitionTable | Sequence[TransitionTable] | None,
        batch_size: int,
        imaginary_ratio: float,
    ):
        sources = [imaginary] if isinstance(imaginary, TransitionTable) else list(imaginary or ())
        super().__init__(len(sources), batch_size, imaginary_ratio)
        self.real = real
        self.sources = sources

    def sample(self, rng: np.random.Generator) -> d3rlpy.dataset.TransitionMiniBatch:
        parts = []
        if self.n_real:
            parts.append(self.real.take(rng.integers(len(self.real), size=self.n_real)))
        if self.n_imaginary:
            counts = self.imaginary_counts(rng)
            parts.extend(t.take(rng.integers(len(t), size=int(c))) for t, c in zip(self.sources, counts) if c)
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return d3rlpy.dataset.TransitionMiniBatch(
            observations=merged["observations"],
            actions=merged["actions"],
            rewards=merged["rewards"],
            next_observations=merged["next_observations"],
            next_actions=merged["next_actions"],
            terminals=merged["terminals"],
            intervals=np.ones_like(merged["terminals"]),
            transitions=[],
        )


class EpisodeTable:
    """The episodes of one source and every ``(episode, step)`` a slice can end at."""

    def __init__(self, episodes: Sequence[d3rlpy.dataset.Episode]):
        self.episodes = list(episodes)
        ends = [(i, t) for i, ep in enumerate(self.episodes) for t in range(ep.size())]
        if not ends:
            raise ValueError("the dataset holds no transitions")
        self.ends = np.array(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def observations(self) -> np.ndarray:
        return np.concatenate([ep.observations for ep in self.episodes]).astype(np.float32)


class TrajectorySampler(_Shares):
    """Mini-batches of ``context``-step episode slices for sequence models, with the
    same real/imaginary shares as :class:`MixedSampler`."""

    def __init__(self, real: EpisodeTable, imaginary: Sequence[EpisodeTable], batch_size: int,
                 imaginary_ratio: float, context: int):
        super().__init__(len(imaginary), batch_size, imaginary_ratio)
        self.real, self.sources, self.context = real, list(imaginary), context
        self._slice = d3rlpy.dataset.BasicTrajectorySlicer()

    def _slices(self, table: EpisodeTable, n: int, rng: np.random.Generator) -> list:
        picked = table.ends[rng.integers(len(table), size=n)]
        return [self._slice(table.episodes[i], int(t), self.context) for i, t in picked]

    def sample(self, rng: np.random.Generator) -> d3rlpy.dataset.TrajectoryMiniBatch:
        slices = self._slices(self.real, self.n_real, rng) if self.n_real else []
        if self.n_imaginary:
            for table, count in zip(self.sources, self.imaginary_counts(rng)):
                if count:
                    slices += self._slices(table, int(count), rng)
        return d3rlpy.dataset.TrajectoryMiniBatch.from_partial_trajectories(slices)
