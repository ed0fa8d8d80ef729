"""Imagination without an LLM: the ablation that shows what the LLM adds.

Everything but the rollouts is :func:`kalm.imagine.rollouts.imagine`'s: the same prompts
(instruction and start state), the same stop at the goal, physics and robustness
filters and predicate labels. Each rollout comes from the offline-RL policy trained on
the real data alone, which reads the instruction through the same frozen sentence
encoder as every policy, acting inside an MLP dynamics model trained on the real
transitions (:class:`~kalm.grounding.dynamics_baseline.MLPDynamics`). If this does as
well as the LLM, the LLM's language knowledge is not what makes KALM's data useful.

The pair has no done signal: a rollout ends where its task holds in imagination or at
the step limit. Actions are sampled from the policy's distribution at the level's
temperature, as the LLM's are (greedy at 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kalm.data.episodes import EpisodeDataset
from kalm.envs.spec import EnvSpec
from kalm.grounding.dynamics_baseline import MLPDynamics, fit_mlp_dynamics, transition_arrays
from kalm.imagine.generate import GeneratedRollout, GenerationConfig, StopFn, batch_generator, carry_state
from kalm.imagine.rollouts import ImagineConfig, ImagineResult, imagine_from
from kalm.offline.policy import LanguagePolicy


def fit_dynamics(dataset: EpisodeDataset, spec: EnvSpec, steps: int, seed: int) -> tuple[MLPDynamics, dict]:
    """An :class:`MLPDynamics` trained on every transition of ``dataset``."""
    pairs = [(e, t) for e in dataset.episodes for t in range(len(e.actions))]
    states, actions, nexts = transition_arrays(pairs)
    model, info = fit_mlp_dynamics(states, actions, nexts, spec.action_dim, spec.discrete, steps, seed)
    return model, {**info, "transitions": len(pairs)}


class PolicyDynamicsRollouts:
    """A :class:`~kalm.imagine.generate.RolloutSource`: ``policy`` acts on imagined
    states, ``dynamics`` imagines the next ones."""

    def __init__(self, policy: LanguagePolicy, dynamics: MLPDynamics, names: dict | None = None):
        if (dynamics.state_dim, dynamics.action_dim) != (policy.config["state_dim"], policy.config["action_size"]):
            raise ValueError(f"the dynamics model takes {dynamics.state_dim}-d states and {dynamics.action_dim} "
                             f"actions, the policy {policy.config['state_dim']} and {policy.config['action_size']}")
        self.policy, self.dynamics, self.names = policy, dynamics, names or {}
        self.step_scale = dynamics.delta_scale.numpy().copy()
        self.every = 1  # the policy acts, and the dynamics model predicts, step by step

    def describe(self) -> dict:
        return {"source": "imagined without an LLM", **self.names}

    def generate(self, instructions: Sequence[str], initial_states: np.ndarray, config: GenerationConfig,
                 stop: StopFn | None, seed: int, progress: Callable[[int], None] | None,
                 carried_state: Sequence[tuple],
                 prompt_ids: Sequence[int] | None = None) -> list[GeneratedRollout]:
        initial_states = np.asarray(initial_states, dtype=np.float32)
        if len(instructions) != len(initial_states):
            raise ValueError(f"{len(instructions)} instructions but {len(initial_states)} initial states")
        embeddings = self.policy.encoder.encode(list(instructions))
        out: list[GeneratedRollout] = []
        for start in range(0, len(instructions), config.batch_size):
            end = min(start + config.batch_size, len(instructions))
            out += self._batch(instructions[start:end], initial_states[start:end], embeddings[start:end], config,
                               stop, batch_generator(seed, prompt_ids, start), start, carried_state)
            if progress is not None:
                progress(end - start)
        return out

    def _batch(self, instructions, starts, embeddings, config, stop, generator, offset,
               carried) -> list[GeneratedRollout]:
        state = starts.copy()
        states, actions = [state], []
        ended = np.full(len(starts), -1)
        for t in range(config.max_steps):
            action = self.policy.act_batch(state, embeddings, config.temperature, generator)
            following = self.dynamics.predict(state, action)
            state = carry_state(following, state, carried)
            actions.append(np.asarray(action))
            states.append(state)
            if stop is not None:
                for i in np.flatnonzero(ended < 0):
                    if stop(offset + i, state[i]):
                        ended[i] = t + 1
            if np.all(ended >= 0):
                break
        all_states, all_actions = np.stack(states, axis=1), np.stack(actions, axis=1)
        rollouts = []
        for i, text in enumerate(instructions):
            n = int(ended[i]) if ended[i] >= 0 else len(actions)
            rollouts.append(GeneratedRollout(text, all_states[i, : n + 1].astype(np.float32), all_actions[i, :n],
                                             "stop" if ended[i] >= 0 else "horizon"))
        return rollouts


def imagine_without_llm(policy_dir: str | Path, dynamics_path: str | Path, spec: EnvSpec,
                        config: ImagineConfig, progress: bool = True) -> ImagineResult:
    """Imagine ``config``'s rollouts with a trained policy directory and a saved
    :class:`MLPDynamics` instead of a grounded LLM (explain-back needs an LLM and is
    not applied)."""
    policy = LanguagePolicy(policy_dir)
    if policy.env != spec.name:
        raise ValueError(f"the policy in {policy_dir} was trained on {policy.env!r}, not {spec.name!r}")
    source = PolicyDynamicsRollouts(policy, MLPDynamics.load(dynamics_path),
                                    {"policy": str(policy_dir), "dynamics": str(dynamics_path)})
    return imagine_from(source, spec, config, progress)
