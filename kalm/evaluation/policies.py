"""What evaluation can run: a trained policy, and two reference rows.

All three go through the same episode loop (:mod:`kalm.evaluation.evaluate`): at the
start of an episode a policy is told the environment, the instruction and the start
observation, and returns the function that maps each observation to an action. A
policy that can act for many episodes at once (:class:`BatchEvalPolicy`, such as the
LLM policy) is stepped through them in lockstep instead, with the same results.

- ``random`` acts uniformly at random: the floor any policy must beat.
- ``expert`` is the environment's scripted planner given the *task* (not the text):
  the ceiling of what is solvable within the horizon.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec, Instruction
from kalm.offline.policy import LanguagePolicy

ActFn = Callable[[np.ndarray], Any]


class EvalPolicy(Protocol):
    name: str

    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator) -> ActFn: ...


class BatchEvalPolicy(EvalPolicy, Protocol):
    """A policy that can also act for ``batch_size`` episodes at once (evaluation then
    steps that many episodes together): ``begin_batch(instructions, starts, rngs)``
    (``rngs``: the generator each episode's ``begin`` would get) returns the function
    from the batch's observations and its mask of still-running episodes to its actions
    (the rows of ended episodes are not used)."""

    batch_size: int

    def begin_batch(self, instructions: Sequence[Instruction], starts: np.ndarray,
                    rngs: Sequence[np.random.Generator] | None = None) -> Callable[..., Any]: ...


# Episodes a trained policy acts for at once in evaluation: one network call per step
# instead of one per episode (a quarter of a BC policy's evaluation time on a CPU core)
LOCKSTEP_EPISODES = 64


class TrainedPolicy:
    """A policy directory written by ``kalm train``: greedy, ε-greedy, or sampling.

    A greedy deterministic policy that takes a push which changes nothing (a ball
    against a wall) sees the same state again and repeats it until the horizon. Two
    ways out: an ``epsilon`` share of uniformly random actions (as in d3rlpy's and
    DQN's Atari evaluations), or ``temperature`` > 0, which draws every action from the
    policy's own distribution (its logits divided by the temperature; discrete BC and
    Decision Transformer), so a repeated state need not give a repeated action. Both
    draw from the episode's seeded generator, and reports name the setting used.
    """

    def __init__(self, policy_dir: str | Path, embedding_cache: str | Path | None = None, epsilon: float = 0.0,
                 temperature: float = 0.0):
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        self.policy = LanguagePolicy(policy_dir, embedding_cache)
        if temperature > 0 and not self.policy.samples:  # refused before any episode runs
            raise ValueError(f"{self.policy.name}: sampling actions needs a policy with a discrete action "
                             "distribution (discrete BC or Decision Transformer); this one only acts greedily "
                             "(use temperature 0, or epsilon for random actions)")
        self.epsilon, self.temperature = epsilon, temperature
        suffix = (f"@eps{epsilon:g}" if epsilon else "") + (f"@T{temperature:g}" if temperature else "")
        self.name = self.policy.name + suffix
        self.env = self.policy.env
        self._random = RandomPolicy(get_spec(self.env))

    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator) -> ActFn:
        embedding = self.policy.embed(instruction.text)
        act = self.policy.episode_actor(embedding, instruction.task, start, self.temperature, rng)
        if self.epsilon == 0:
            return act
        explore = self._random.begin(env, instruction, start, rng)
        epsilon = self.epsilon

        def act_or_explore(obs):
            # a sequence model is shown every state, so its history keeps the episode's
            # states and timesteps (it records its own choice where a random one was taken)
            action = act(obs)
            return explore(obs) if rng.random() < epsilon else action

        return act_or_explore if self.policy.is_sequence_model else (
            lambda obs: explore(obs) if rng.random() < epsilon else act(obs))

    @property
    def batch_size(self) -> int:
        """A policy of the current state alone acts for many episodes at once; a sequence
        model acts on its own episode's history, one episode at a time."""
        return 1 if self.policy.is_sequence_model else LOCKSTEP_EPISODES

    def begin_batch(self, instructions: Sequence[Instruction], starts: np.ndarray,
                    rngs: Sequence[np.random.Generator] | None = None) -> Callable[..., np.ndarray]:
        """Act for several episodes with one network call per step. Each episode draws
        from its own generator in the order :meth:`begin` would (the ε coin, then the
        random or sampled action), so it acts as it would alone."""
        rngs = list(rngs) if rngs is not None else [np.random.default_rng() for _ in instructions]
        embeddings = np.stack([self.policy.embed(ins.text) for ins in instructions])
        explore = [self._random.begin(None, ins, start, rng) for ins, start, rng in zip(instructions, starts, rngs)]
        epsilon, temperature, discrete = self.epsilon, self.temperature, self.policy.discrete

        def act(observations: np.ndarray, running: np.ndarray | None = None) -> np.ndarray:
            observations = np.asarray(observations)
            rows = np.arange(len(rngs)) if running is None else np.flatnonzero(running)
            if temperature > 0:
                chosen = self.policy.action_probabilities(observations[rows], embeddings[rows], temperature)
            else:
                chosen = self.policy.act_batch(observations[rows], embeddings[rows])
            actions = (np.zeros(len(rngs), np.int64) if discrete
                       else np.zeros((len(rngs), *np.shape(chosen)[1:]), np.float32))
            for j, i in enumerate(rows):
                rng = rngs[i]
                if epsilon and rng.random() < epsilon:
                    actions[i] = explore[i](observations[i])
                elif temperature > 0:
                    probs = chosen[j]
                    actions[i] = int(rng.choice(len(probs), p=probs / probs.sum()))
                else:
                    actions[i] = chosen[j]
            return actions

        return act


class RandomPolicy:
    """Uniform actions from the spec's action space, drawn from the episode's generator."""

    name = "random"

    def __init__(self, spec: EnvSpec):
        self.space = spec.action_space

    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator) -> ActFn:
        space = self.space
        if isinstance(space, gym.spaces.Discrete):
            return lambda obs: int(space.start + rng.integers(space.n))
        if isinstance(space, gym.spaces.Box):
            return lambda obs: rng.uniform(space.low, space.high).astype(space.dtype)
        raise ValueError(f"random policy: unsupported action space {space!r}")


class ExpertPolicy:
    """The scripted expert, planning for the instruction's task."""

    name = "expert"

    def __init__(self, spec: EnvSpec):
        self.spec = spec
        self._experts: dict[int, Callable] = {}

    def begin(self, env: gym.Env, instruction: Instruction, start: np.ndarray, rng: np.random.Generator) -> ActFn:
        key = id(env)
        if key not in self._experts:
            self._experts[key] = self.spec.make_expert(env)
        expert = self._experts[key]
        task = instruction.task
        start = np.array(start, copy=True)
        return lambda obs: expert(obs, task, start)


BASELINES = ("random", "expert")


def make_policy(policy_dir: Path | None, baseline: str | None, env: str | None,
                embedding_cache: Path | None = None, epsilon: float = 0.0,
                temperature: float = 0.0) -> tuple[EvalPolicy, str]:
    """The policy to evaluate and its environment's name: a trained policy directory,
    or a reference policy by name (which then needs ``env``)."""
    if (policy_dir is None) == (baseline is None):
        raise ValueError("give exactly one of --policy DIR and --baseline random|expert")
    if policy_dir is not None:
        trained = TrainedPolicy(policy_dir, embedding_cache, epsilon, temperature)
        if env is not None and env != trained.env:
            raise ValueError(f"the policy was trained on {trained.env!r}, not {env!r}")
        return trained, trained.env
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r} (use {' or '.join(BASELINES)})")
    if env is None:
        raise ValueError("--baseline needs --env")
    spec = get_spec(env)
    return (RandomPolicy(spec) if baseline == "random" else ExpertPolicy(spec)), env
