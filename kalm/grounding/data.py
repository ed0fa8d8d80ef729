"""Episodes -> grounding examples: the split, the phrasings, and batch sampling.

The validation split is by *episode*: every task built from a held-out episode is
held out, so no trajectory leaks across splits through another prompt (reference
§9.12). Instruction phrasings are split too when the env offers
``spec.grounding_phrasings``: training draws only the training phrasings, validation
uses the held-out ones.

Explanation, generation and goal examples use only episodes whose final state
satisfies their task (checked with the task's own predicate): a failed episode is
not an example of its instruction. Dynamics uses every transition.

Batches are deterministic functions of ``(seed, step, micro-step, process)``, so a
resumed run sees exactly the batches the killed one would have.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from kalm.grounding.prompts import TASKS, Example, PromptBuilder


@dataclass(frozen=True)
class GroundingEpisode:
    """An episode with its parsed task and the phrasings grounding may use."""

    observations: np.ndarray
    actions: np.ndarray
    terminated: bool
    task: object
    task_json: dict
    success: bool
    train_phrasings: tuple[str, ...]
    validation_phrasings: tuple[str, ...]

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])


def prepare_episodes(dataset, spec) -> list[GroundingEpisode]:
    """Parse every episode's task and attach its phrasings (no simulator involved). An
    environment with ``spec.waypoints`` is grounded on its episodes' waypoints: every
    grounding task then works at that time scale."""
    out = []
    for i, ep in enumerate(dataset.episodes):
        if ep.observations.shape[1] != spec.state_dim:
            raise ValueError(f"episode {i}: states have {ep.observations.shape[1]} numbers, "
                             f"env {spec.name!r} has {spec.state_dim}")
        if ep.length < 1:
            continue
        task = spec.parse_task(ep.task)
        obs, actions = np.asarray(ep.observations, np.float32), np.asarray(ep.actions)
        if spec.waypoints is not None:
            obs, actions = spec.waypoints.encode(obs, actions)
        train, val = (ep.instruction,), (ep.instruction,)
        if spec.grounding_phrasings is not None:
            with contextlib.suppress(ValueError):
                train, val = (tuple(p) for p in spec.grounding_phrasings(task))
        out.append(GroundingEpisode(
            observations=obs,
            actions=actions,
            terminated=bool(ep.terminated),
            task=task,
            task_json=dict(ep.task),
            success=bool(task.success(obs[-1], obs[0])),
            train_phrasings=train,
            validation_phrasings=val,
        ))
    if not out:
        raise ValueError("the dataset has no episodes with at least one step")
    return out


def split_episodes(episodes: list, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and validation episodes (a seeded permutation)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = np.random.default_rng(seed).permutation(len(episodes))
    n_val = round(len(episodes) * validation_fraction)
    if validation_fraction > 0 and len(episodes) > 1:
        n_val = max(n_val, 1)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def split_hindsight(spec, hindsight, validation_fraction: float, seed: int) -> tuple[list, list]:
    """Training and held-out episodes of a hindsight dataset (or none): a seeded split,
    recomputed identically on resume, so it need not be stored."""
    if hindsight is None:
        return [], []
    if hindsight.env != spec.name:
        raise ValueError(f"the hindsight episodes were collected in env {hindsight.env!r}, not {spec.name!r}")
    episodes = prepare_episodes(hindsight, spec)
    train_idx, val_idx = split_episodes(episodes, validation_fraction, seed)
    return [episodes[i] for i in train_idx], [episodes[i] for i in val_idx]


class ExampleSampler:
    """Draws training examples of each task from a set of episodes.

    ``extra`` is a second pool (hindsight-labelled simulator rollouts) that each
    example comes from with probability ``extra_share``: the expert episodes keep their
    weight however many extra episodes there are.
    """

    def __init__(self, builder: PromptBuilder, episodes: list[GroundingEpisode], max_trajectory_steps: int,
                 validation: bool = False, extra: list[GroundingEpisode] | None = None, extra_share: float = 0.0):
        self.builder = builder
        self.episodes = episodes
        self.max_steps = max_trajectory_steps
        self.validation = validation
        self.successful = [e for e in episodes if e.success]
        if not self.successful:
            raise ValueError("no episode reaches its task's goal; explanation, generation and goal examples need some")
        if not 0.0 <= extra_share <= 1.0:
            raise ValueError(f"extra_share must be in [0, 1], got {extra_share}")
        self.extra = [e for e in extra or () if e.success]
        if extra_share > 0 and not self.extra:
            raise ValueError("a share of examples from extra episodes was asked for, but none reaches its goal")
        self.extra_share = extra_share

    def _pools(self, rng: np.random.Generator) -> tuple[list[GroundingEpisode], list[GroundingEpisode]]:
        """(all episodes, successful episodes) of the pool this example comes from."""
        if self.extra_share > 0 and rng.random() < self.extra_share:
            return self.extra, self.extra
        return self.episodes, self.successful

    def phrasing(self, ep: GroundingEpisode, rng: np.random.Generator) -> str:
        options = ep.validation_phrasings if self.validation else ep.train_phrasings
        return options[int(rng.integers(len(options)))]

    def example(self, task: str, rng: np.random.Generator) -> Example:
        b = self.builder
        everything, successful = self._pools(rng)
        if task == "dynamics":
            ep = everything[int(rng.integers(len(everything)))]
            t = int(rng.integers(ep.length))
            return b.dynamics(ep.observations[t], ep.actions[t], ep.observations[t + 1])
        ep = successful[int(rng.integers(len(successful)))]
        text = self.phrasing(ep, rng)
        if task == "explanation":
            return b.explanation(*self.explanation_window(ep), text)
        if task == "generation":
            k = min(ep.length, self.max_steps)
            ends = ep.terminated and k == ep.length
            return b.generation(ep.observations[: k + 1], ep.actions[:k], text, ends)
        if task == "goal":
            return b.goal(ep.observations[0], text, ep.observations[-1])
        raise ValueError(f"unknown grounding task {task!r} (expected one of {', '.join(TASKS)})")

    def explanation_window(self, ep: GroundingEpisode) -> tuple[np.ndarray, np.ndarray]:
        """The last ``max_steps`` steps: the outcome is what an instruction describes."""
        start = max(0, ep.length - self.max_steps)
        return ep.observations[start:], ep.actions[start:]

    def batch(self, task: str, rng: np.random.Generator, batch_tokens: int, max_batch_size: int) -> list[Example]:
        """Examples of one task until the padded batch would exceed ``batch_tokens``
        (always at least one): short dynamics prompts come many to a batch."""
        examples = [self.example(task, rng)]
        longest = len(examples[0])
        while len(examples) < max_batch_size:
            candidate = self.example(task, rng)
            width = max(longest, len(candidate))
            if width * (len(examples) + 1) > batch_tokens:
                break
            examples.append(candidate)
            longest = width
        return examples


def step_rng(seed: int, step: int, micro: int) -> np.random.Generator:
    """The generator of micro-batch ``micro`` of optimizer step ``step``: batches are a
    function of their place in training, not of the process that runs them, so a run
    resumes exactly and trains alike on any number of processes."""
    return np.random.default_rng([seed, step, micro])


def choose_task(weights: dict[str, float], rng: np.random.Generator) -> str:
    names = [n for n in TASKS if weights.get(n, 0.0) > 0]
    if not names:
        raise ValueError("every grounding task has weight 0")
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]
