"""Short simulator rollouts labelled in hindsight with the one goal they achieved.

Expert episodes are few and each carries the instruction it was *asked* for, which
its trajectory may share with side effects (other relations that became true on the
way). The simulator is cheap, so grounding can also learn from rollouts whose
description the trajectory itself determines: roll out a few random or ε-expert
actions and stop at the first step where any training goal becomes true. If exactly
one did, the trajectory is an unambiguous example of that goal (reading it back,
explanation has one right answer); if several did at once, it is dropped.

Only the environment's *training* tasks are used as labels and phrased with their
training phrasings, so the evaluation's novel tasks and held-out wordings stay unseen.
Where scenes differ (Meta-World builds one per skill), a rollout is labelled only with
the goals its own scene holds (``EnvSpec.scene_goals``). Random actions never complete
a Meta-World skill in a whole episode (0 of 100 over the ten skills), so there the
rollouts are ε-expert ones steered toward the scene's skill, and a label tells the
LLM which of the noisy paths reached it.
Episode ``i`` depends only on ``(seed, i)``, so the collection shards and resumes like
the expert's (:func:`kalm.data.collect.collect_to_file`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import pairwise

import numpy as np

from kalm.data.episodes import Episode
from kalm.envs.spec import EnvSpec, Task, goal_key


@dataclass(frozen=True)
class HindsightConfig:
    """How to make hindsight-labelled episodes.

    Attributes:
        episodes: number of (determined) episodes to keep.
        seed: episode ``i`` is drawn from a generator seeded with ``[seed, i]``.
        max_steps: actions per rollout before it is given up on when nothing became true.
        expert_share: share of rollouts steered by the ε-expert toward a random training
            task (the rest take uniformly random actions). On CLEVR-Robot random pushes
            alone cover all 40 goals at 200 episodes/s, 10× the steered rate; an env
            whose goals random actions rarely reach (Meta-World) needs steering.
        epsilon: random-action share of the steering expert.
        reward: name of the reward in ``spec.rewards`` used to label transitions.
        chunk_size: episodes per shard when writing to a file.
        max_tries: rollouts drawn per kept episode before giving up with an error.
    """

    episodes: int = 20000
    seed: int = 0
    max_steps: int = 4
    expert_share: float = 0.0
    epsilon: float = 0.2
    reward: str = "sparse"
    chunk_size: int = 1000
    max_tries: int = 200

    def check(self, spec: EnvSpec) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {self.episodes}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("expert_share", "epsilon"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.reward not in spec.rewards:
            raise ValueError(f"unknown reward {self.reward!r} (available: {', '.join(sorted(spec.rewards))})")
        if self.chunk_size < 1 or self.max_tries < 1:
            raise ValueError("chunk_size and max_tries must be >= 1")

    def make_episode(self, spec: EnvSpec, env, index: int) -> Episode:
        return hindsight_episode(spec, env, index, self)

    def metadata(self, spec: EnvSpec) -> dict:
        return {
            "source": "hindsight",
            "env": spec.name,
            "episodes": self.episodes,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "expert_share": self.expert_share,
            "epsilon": self.epsilon,
            "reward": self.reward,
            "tasks": "training",
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


class LabelVocabulary:
    """The training goals a trajectory can be labelled with, one entry per goal.

    Several tasks may name one goal ("red left of blue" is "blue right of red");
    labels are goals, and a goal is phrased through any of its names.
    """

    def __init__(self, tasks: Sequence[Task]):
        self.names: dict[str, list[Task]] = {}
        for task in tasks:
            self.names.setdefault(goal_key(task), []).append(task)
        self.goals = [names[0] for names in self.names.values()]

    def achieved(self, state: np.ndarray, start: np.ndarray) -> list[Task]:
        """Goals that hold in ``state`` but did not at ``start``."""
        return [g for g in self.goals if g.success(state, start) and not g.success(start, start)]

    def name(self, goal: Task, rng: np.random.Generator) -> Task:
        options = self.names[goal_key(goal)]
        return options[int(rng.integers(len(options)))]


def label_goals(spec: EnvSpec, scene: Task) -> Sequence[Task]:
    """The training goals a rollout in ``scene``'s scene may be labelled with."""
    return spec.training_tasks() if spec.scene_goals is None else spec.scene_goals(scene)


def hindsight_labels(spec: EnvSpec, observations: np.ndarray, scene: Task | None = None) -> list[Task]:
    """The training goals a trajectory achieved by its last state (see :class:`LabelVocabulary`);
    ``scene`` is the task whose scene it ran in (needed where ``spec.scene_goals`` is set)."""
    if spec.scene_goals is not None and scene is None:
        raise ValueError(f"env {spec.name!r} labels a trajectory by its scene: pass the scene's task")
    vocabulary = LabelVocabulary(label_goals(spec, scene))
    return vocabulary.achieved(np.asarray(observations[-1]), np.asarray(observations[0]))


def _rollout(spec: EnvSpec, env, config: HindsightConfig,
             rng: np.random.Generator) -> tuple[list[np.ndarray], list, Task | None, LabelVocabulary]:
    """One rollout until the first step where something became true; its label when
    exactly one goal did, and the vocabulary of its scene."""
    tasks = spec.training_tasks()
    steer = tasks[int(rng.integers(len(tasks)))]
    vocabulary = LabelVocabulary(label_goals(spec, steer))  # about 0.1 ms: not worth a cache
    obs, _ = env.reset(seed=int(rng.integers(2**31)), options={"task": steer})
    start = np.array(env.unwrapped.start_state, dtype=np.float32)
    expert = None
    if rng.random() < config.expert_share:
        expert = spec.make_expert(env, epsilon=config.epsilon, seed=int(rng.integers(2**63)))
    states, actions = [np.asarray(obs, dtype=np.float32)], []
    for _ in range(config.max_steps):
        action = expert(obs, steer, start) if expert is not None else _random_action(spec, rng)
        obs, _, _, truncated, _ = env.step(action)
        states.append(np.asarray(obs, dtype=np.float32))
        actions.append(action)
        achieved = vocabulary.achieved(states[-1], start)
        if achieved:
            return states, actions, (achieved[0] if len(achieved) == 1 else None), vocabulary
        if truncated:
            break
    return states, actions, None, vocabulary


def _random_action(spec: EnvSpec, rng: np.random.Generator):
    if spec.discrete:
        return int(rng.integers(spec.action_dim))
    space = spec.action_space
    return rng.uniform(space.low, space.high).astype(np.float32)


def hindsight_episode(spec: EnvSpec, env, index: int, config: HindsightConfig) -> Episode:
    """Episode ``index``: the first of its seeded rollouts that achieved exactly one goal."""
    rng = np.random.default_rng([config.seed, index])
    reward_fn = spec.rewards[config.reward]
    for _ in range(config.max_tries):
        states, actions, goal, vocabulary = _rollout(spec, env, config, rng)
        if goal is None:
            continue
        task = vocabulary.name(goal, rng)
        start = states[0]
        return Episode(
            observations=np.stack(states),
            actions=np.asarray(actions),
            rewards=np.asarray([reward_fn(task, s, n, start) for s, n in pairwise(states)],
                               dtype=np.float32),
            terminated=True,
            truncated=False,
            instruction=spec.training_instruction(task, rng),
            task=task.to_json(),
        )
    raise ValueError(f"hindsight episode {index}: none of {config.max_tries} rollouts of up to "
                       f"{config.max_steps} steps achieved exactly one training goal in env {spec.name!r}; "
                       "raise max_steps or expert_share")
