"""Imagine a conjunction of goals one part at a time.

Why: asked directly for "put the red ball left of the blue one and the green ball
behind the cyan one", the grounded CLEVR-Robot LLM ends its rollout after about three
pushes, as the single-goal rollouts it was grounded on do, and no rollout reached such
a goal (0 of 120 with the 400-step CPU model). Single-goal generation is what grounding
trained, so the composite is imagined as a chain: each segment is prompted with a
training phrasing of one part and starts from the imagined state where the previous
segment ended; the whole chain is labelled with the composite instruction. The task
structure comes from the task itself (:func:`kalm.envs.spec.subgoals`), as the success
predicate that labels every imagined rollout does; every state and action comes from
the rollout source (the LLM, or the ablation without one). With these chains, KALM's
CLEVR hard success in ``kalm run --config clevr-default`` was 6.4 % against the baseline's 3.9 % (docs/results.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from kalm.envs.spec import EnvSpec, Instruction, subgoals
from kalm.imagine.filters import robust_success_share
from kalm.imagine.generate import (
    GeneratedRollout,
    GenerationConfig,
    RolloutSource,
    stop_at_goal,
)


def imagine_composed(
    source: RolloutSource,
    spec: EnvSpec,
    instructions: Sequence[Instruction],
    starts: np.ndarray,
    generation: GenerationConfig,
    segment_steps: int,
    seed: int,
    robust_noise: float = 0.0,
    robust_share: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> list[GeneratedRollout]:
    """Chain one imagined segment per part of each instruction's conjunction.

    A part that already holds takes no step. A segment that ends without its part
    holding in imagination, or with an earlier part broken, ends the chain there: the
    rollout is returned as it stands and its label says it failed. With
    ``robust_noise`` > 0 the part a segment steered to must also hold robustly
    (:func:`~kalm.imagine.filters.robust_success_share` over that segment's steps), so
    the finished chain needs no second check. Why per part: noising every ball of the
    final state for the whole conjunction instead kept 21 of the 116 chains that
    reached their goal in imagination (docs/results.md)."""
    parts = _conjunction_parts(instructions)
    if segment_steps < 1:
        raise ValueError(f"segment_steps must be at least 1, got {segment_steps}")
    rng = np.random.default_rng(seed)
    robust = _RobustCheck(robust_noise, robust_share, source.step_scale, np.random.default_rng(seed + 1))
    generation = replace(generation, max_steps=segment_steps)
    n = len(instructions)
    states = [[np.asarray(s, dtype=np.float32)] for s in starts]
    actions: list[list] = [[] for _ in range(n)]
    stopped_by = ["stop"] * n
    alive = list(range(n))
    for j in range(max(len(p) for p in parts)):
        rows = [i for i in alive if j < len(parts[i])]
        pending = [i for i in rows if not parts[i][j].success(states[i][-1], starts[i])]
        if not pending:
            continue
        segment = _generate_segment(source, spec, [parts[i][j] for i in pending], [starts[i] for i in pending],
                                    np.stack([states[i][-1] for i in pending]), generation, seed + j, rng, progress)
        failed = set()
        for i, rollout in zip(pending, segment):
            states[i].extend(rollout.states[1:])
            actions[i].extend(rollout.actions)
            stopped_by[i] = rollout.stopped_by
            if not _segment_ends_well(parts[i], j, states[i], starts[i], len(rollout.actions), robust):
                failed.add(i)
        alive = [i for i in alive if i not in failed]
    return [_as_rollout(spec, ins, states[i], actions[i], stopped_by[i]) for i, ins in enumerate(instructions)]


def _conjunction_parts(instructions: Sequence[Instruction]) -> list[tuple]:
    parts = [subgoals(ins.task) for ins in instructions]
    if not all(parts):
        missing = next(ins for ins, p in zip(instructions, parts) if not p)
        raise ValueError(f"not a conjunction of goals: {missing.task.to_json()} ({missing.text!r})")
    return parts


def _generate_segment(
    source: RolloutSource, spec: EnvSpec, goals: list, starts: list[np.ndarray], states: np.ndarray,
    generation: GenerationConfig, seed: int, rng: np.random.Generator, progress: Callable[[int], None] | None,
) -> list[GeneratedRollout]:
    """One segment per goal from ``states``, each prompted with a training phrasing of
    its goal (drawn with ``rng``) and ending where the goal holds or after
    ``generation.max_steps``.

    The rows are generated in the order of their phrasings, so rows that share one sit
    in the same batch and share its prompt's prefill (:func:`kalm.imagine.generate.prefill`),
    most of a 3-step segment's cost: 2,000 CLEVR hard segments drawn this way carry 925
    phrasings, and grouped they are generated 1.56x as fast (docs/benchmarks.md)."""
    texts = [spec.training_instruction(goal, rng) for goal in goals]
    order = sorted(range(len(goals)), key=texts.__getitem__)
    stop = stop_at_goal([goals[i] for i in order], [starts[i] for i in order], [generation.max_steps] * len(goals))
    generated = source.generate([texts[i] for i in order], states[order], generation, stop, seed, progress,
                                spec.carried_state)
    rollouts: list[GeneratedRollout] = [None] * len(goals)  # type: ignore[list-item]
    for position, i in enumerate(order):
        rollouts[i] = generated[position]
    return rollouts


@dataclass(frozen=True)
class _RobustCheck:
    """Whether a reached part holds robustly (always, when ``noise`` is not positive)."""

    noise: float
    share: float
    step_scale: np.ndarray
    rng: np.random.Generator

    def holds(self, part, states: np.ndarray, steps: int) -> bool:
        if not self.noise > 0:
            return True
        return robust_success_share(part, states, self.step_scale, self.noise, self.rng, steps=steps) >= self.share


def _segment_ends_well(parts: tuple, j: int, states: list[np.ndarray], start: np.ndarray, steps: int,
                       robust: _RobustCheck) -> bool:
    """The segment for part ``j`` took a step and ended with finite states where parts
    ``0..j`` all hold, and part ``j`` robustly."""
    final = states[-1]
    reached = steps > 0 and bool(np.all(np.isfinite(final))) and all(
        part.success(final, start) for part in parts[: j + 1])
    return reached and robust.holds(parts[j], np.stack(states), steps)


def _as_rollout(spec: EnvSpec, ins: Instruction, states: list[np.ndarray], actions: list,
                stopped_by: str) -> GeneratedRollout:
    acts = np.asarray(actions) if actions else np.zeros((0, *spec.action_space.shape), dtype=spec.action_space.dtype)
    return GeneratedRollout(ins.text, np.stack(states), acts, stopped_by)
