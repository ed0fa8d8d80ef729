"""Imagine labelled rollouts for a level's instructions with a grounded LLM.

This is the one place that joins a grounded model with the environment's tasks: start
states come from the real environment's reset distribution (so they are states a
policy will meet), rollouts come from the LLM, and the task predicates label them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kalm.data.episodes import Episode, EpisodeDataset
from kalm.envs.spec import EnvSpec, Instruction, subgoals
from kalm.grounding.model import PRECISIONS
from kalm.imagine.compose import imagine_composed
from kalm.imagine.filters import (
    HallucinationStats,
    check_rollout,
    is_plausible,
    robust_success_share,
)
from kalm.imagine.generate import GeneratedRollout, GenerationConfig, LLMRollouts, RolloutSource, stop_at_goal
from kalm.imagine.label import label_rollout
from kalm.parallel import gather_in_order, process_group, shard, share_from_first


@dataclass(frozen=True)
class ImagineConfig:
    """What to imagine and what to keep.

    ``keep_failures``: rollouts that never reach the goal stay in the data with zero
    success reward or are dropped (the default: keeping them cost BC's CLEVR rephrase
    success 29 % -> 18 %; docs/results.md).
    ``physics_filter``: drop rollouts with any implausible transition (on by default:
    such rollouts are far less often real successes on replay, 22 % against 63 % on
    CLEVR; docs/results.md).
    ``explain_back``: drop rollouts whose explanation by the same LLM does not read
    back as their task (only for task kinds the environment can parse from text).
    ``robust_noise``/``robust_share``: drop a success unless the task still holds on
    ``robust_share`` of noisy copies of its last imagined state
    (:func:`~kalm.imagine.filters.robust_success_share`; noise in units of the
    dataset's per-step change; 0 switches the filter off).
    ``compose``: imagine an instruction whose task is a conjunction (CLEVR-Robot's
    ``all_of``) as a chain of single-goal segments of at most ``segment_steps`` each
    (:mod:`kalm.imagine.compose`); other instructions of the level are imagined whole.
    ``starts_per_instruction``: each drawn instruction is imagined from this many start
    states (``n`` rollouts in all); the rows share the instruction's prefill, which
    makes generation faster (1.6x the rollouts/s with 4 starts in fp32; docs/results.md).
    ``precision``: the transformer body's dtype while imagining (``auto``: bf16 where
    the hardware has it; see
    :meth:`~kalm.grounding.model.GroundedLM.use_inference_precision`).
    """

    level: str = "rephrase"
    n: int = 200
    seed: int = 0
    reward: str = "sparse"
    keep_failures: bool = False
    physics_filter: bool = True
    explain_back: bool = False
    robust_noise: float = 0.7
    robust_share: float = 0.5
    compose: bool = False
    segment_steps: int = 3
    starts_per_instruction: int = 1
    precision: str = "auto"
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        if self.robust_noise < 0:
            raise ValueError(f"robust_noise must be >= 0 (0 switches the filter off), got {self.robust_noise}")
        if not 0 < self.robust_share <= 1:
            raise ValueError(f"robust_share must lie in (0, 1], got {self.robust_share}")
        if self.segment_steps < 1:
            raise ValueError(f"segment_steps must be at least 1, got {self.segment_steps}")
        if self.starts_per_instruction < 1:
            raise ValueError(f"starts_per_instruction must be at least 1, got {self.starts_per_instruction}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


# The options of :func:`imagine_config` that belong to ``ImagineConfig.generation``.
_GENERATION_OPTIONS = ("temperature", "max_steps", "batch_size")


def imagine_config(**options: Any) -> ImagineConfig:
    """An :class:`ImagineConfig` with the given fields set and the defaults elsewhere.

    An option given as ``None`` keeps its default, so a command line can pass every
    flag whether or not it was set; ``temperature``, ``max_steps`` and ``batch_size``
    go to the :class:`~kalm.imagine.generate.GenerationConfig`. An unknown name is a
    ``TypeError``, and values are checked as :class:`ImagineConfig` checks them."""
    base = ImagineConfig()
    chosen = {k: v for k, v in options.items() if v is not None}
    generation = replace(base.generation, **{k: chosen.pop(k) for k in _GENERATION_OPTIONS if k in chosen})
    return replace(base, generation=generation, **chosen)


@dataclass(frozen=True)
class ImagineResult:
    """The kept episodes (``None`` when every rollout was dropped), the statistics, and
    every generated rollout as ``(task, start_state, actions)`` for a replay audit."""

    dataset: EpisodeDataset | None
    stats: dict
    attempts: tuple[tuple, ...] = ()


# Names how :func:`sample_prompts` draws. It is part of the pipeline's imagine-stage key,
# so a cached stage whose prompts were drawn another way is rebuilt, not reused.
PROMPT_DRAW = "tasks and phrasings cycled"


def sample_prompts(
    spec: EnvSpec, level: str, n: int, seed: int, starts_per_instruction: int = 1
) -> tuple[list[Instruction], np.ndarray]:
    """``n`` prompts of the level: instructions cycling its tasks evenly and, within a
    task, its phrasings evenly (in a random order, so no phrasing comes round again
    before every other one has), each drawn instruction repeated for
    ``starts_per_instruction`` consecutive prompts, and every prompt its own start state
    from the environment's reset distribution for its task (consecutive repeats share
    their prefill in generation). Drawing phrasings with replacement instead, 2,400
    rephrase prompts offered 1,517 of the 2,400 held-out phrasings, so the rollouts
    spoke in fewer wordings than the level has."""
    if level not in spec.levels:
        raise ValueError(f"unknown level {level!r} (levels: {', '.join(spec.levels)})")
    if starts_per_instruction < 1:
        raise ValueError(f"starts_per_instruction must be at least 1, got {starts_per_instruction}")
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[Instruction]] = {}
    for ins in spec.levels[level](seed):
        by_task.setdefault(str(ins.task.to_json()), []).append(ins)
    groups = list(by_task.values())
    order = rng.permutation(len(groups))
    phrasings = [rng.permutation(len(g)) for g in groups]
    draws = -(-n // starts_per_instruction)
    drawn = []
    for i in range(draws):
        g = int(order[i % len(groups)])
        drawn.append(groups[g][int(phrasings[g][(i // len(groups)) % len(groups[g])])])
    chosen = [ins for ins in drawn for _ in range(starts_per_instruction)][:n]
    env = spec.make_env()
    starts = np.stack(
        [env.reset(seed=int(rng.integers(2**31)), options={"task": ins.task})[0] for ins in chosen]
    )
    env.close()
    return chosen, starts.astype(np.float32)


def _explains_back(model, spec: EnvSpec, episodes, tasks) -> list[bool | None]:
    """Whether the LLM's explanation of each rollout parses to its task (None: this
    kind of task cannot be read from text, so the check does not apply)."""
    from kalm.grounding.decoding import greedy_text

    verdicts: list[bool | None] = []
    for start in range(0, len(episodes), 16):
        chunk = episodes[start : start + 16]
        prompts = [model.prompts.explanation(e.observations, e.actions, None) for e in chunk]
        for text, task in zip(greedy_text(model, prompts, max_new_tokens=32), tasks[start : start + 16]):
            parsed = spec.parse_instruction(text)
            readable = task.kind in ("relation", "push")
            verdicts.append((parsed is not None and parsed.to_json() == task.to_json()) if readable else None)
    return verdicts


def imagine(model, spec: EnvSpec, config: ImagineConfig = ImagineConfig(), progress: bool = True) -> ImagineResult:
    """Generate, check, filter and label ``config.n`` rollouts of ``config.level`` with
    the grounded LLM ``model`` (casting it to ``config.precision`` first, for good)."""
    model.use_inference_precision(config.precision)
    explain = (lambda kept, tasks: _explains_back(model, spec, kept, tasks)) if config.explain_back else None
    return imagine_from(LLMRollouts(model, spec.waypoints), spec, config, progress, explain)


def imagine_from(source: RolloutSource, spec: EnvSpec, config: ImagineConfig, progress: bool = True,
                 explain: Callable | None = None) -> ImagineResult:
    """:func:`imagine` for any :class:`~kalm.imagine.generate.RolloutSource`: the same
    prompts, checks, filters and labels, so sources differ only in their rollouts.
    ``explain(kept, tasks)`` gives the explain-back verdicts (the LLM's own)."""
    instructions, starts = sample_prompts(spec, config.level, config.n, config.seed, config.starts_per_instruction)
    tasks = [ins.task for ins in instructions]
    by_parts = [config.compose and bool(subgoals(task)) for task in tasks]
    generated = _generate(source, spec, config, instructions, starts, by_parts, progress)
    kept, kept_tasks, counts, stats = _check_filter_label(source.step_scale, spec, config, generated, tasks,
                                                          by_parts)
    if explain is not None and kept:
        verdicts = explain(kept, kept_tasks)
        counts["dropped_explain_back"] = sum(v is False for v in verdicts)
        kept = [e for e, v in zip(kept, verdicts) if v is not False]
    counts["kept"] = len(kept)
    summary = {"level": config.level, "counts": counts, "success_share": counts["succeeded"] / max(len(generated), 1),
               "hallucination": stats.summary()}
    metadata = {**source.describe(), "config": asdict(config), "stats": summary}
    dataset = EpisodeDataset(env=spec.name, episodes=tuple(kept), metadata=metadata) if kept else None
    attempts = tuple((task, g.states[0], g.actions) for g, task in zip(generated, tasks) if len(g.actions))
    return ImagineResult(dataset, summary, attempts)


def _generate(
    source: RolloutSource, spec: EnvSpec, config: ImagineConfig, instructions: list[Instruction],
    starts: np.ndarray, by_parts: list[bool], progress: bool,
) -> list[GeneratedRollout]:
    """One rollout per prompt, in prompt order: imagined whole, or (where ``by_parts``)
    as a chain of one segment per part of its conjunction."""
    composed = [i for i, by in enumerate(by_parts) if by]
    whole = [i for i, by in enumerate(by_parts) if not by]
    generated: list = [None] * len(instructions)
    rollouts = _generate_whole(source, spec, config, [instructions[i] for i in whole], starts[whole], progress)
    for i, rollout in zip(whole, rollouts):
        generated[i] = rollout
    if composed:
        # Chains advance together segment by segment, so their batches depend on which
        # chains are still running: the first process imagines them all and shares them.
        index, _ = process_group()
        chains = None
        if index == 0:
            bar = tqdm(desc=f"imagine {config.level} part by part", unit="segment", disable=not progress)
            chains = imagine_composed(
                source, spec, [instructions[i] for i in composed], starts[composed], config.generation,
                config.segment_steps, config.seed, config.robust_noise, config.robust_share, progress=bar.update,
            )
            bar.close()
        for i, rollout in zip(composed, share_from_first(chains)):
            generated[i] = rollout
    return generated


def _generate_whole(
    source: RolloutSource, spec: EnvSpec, config: ImagineConfig, instructions: list[Instruction],
    starts: np.ndarray, progress: bool,
) -> list[GeneratedRollout]:
    """Each instruction imagined in one go, ending where its task holds or at its horizon.

    Under ``accelerate launch`` with N processes, generation batch ``b`` runs on
    process ``b % N``; batches are the one-process batches and sample with their own
    seeds, so the gathered rollouts are the one-process rollouts."""
    index, count = process_group()
    size = config.generation.batch_size
    mine = [i for b in shard(range(0, len(instructions), size), index, count)
            for i in range(b, min(b + size, len(instructions)))]
    tasks = [instructions[i].task for i in mine]
    bar = tqdm(total=len(mine), desc=f"imagine {config.level}", unit="rollout",
               disable=not progress or not mine or index > 0)
    rollouts: list[GeneratedRollout] = []
    if mine:
        rollouts = source.generate(
            [instructions[i].text for i in mine], starts[mine], config.generation,
            stop_at_goal(tasks, starts[mine], [max(1, spec.horizon(task) // source.every) for task in tasks]),
            config.seed, bar.update,
            spec.carried_state, prompt_ids=mine,
        )
    bar.close()
    if count == 1:
        return rollouts
    by_batch = [rollouts[k : k + size] for k in range(0, len(rollouts), size)]
    return [r for batch in gather_in_order(by_batch, index, count) for r in batch]


def _check_filter_label(
    step_scale: np.ndarray, spec: EnvSpec, config: ImagineConfig, generated: list[GeneratedRollout], tasks: list,
    by_parts: list[bool],
) -> tuple[list[Episode], list, dict[str, int], HallucinationStats]:
    """Check every rollout's physics, label it with its task's predicate and keep it
    unless a filter of ``config`` drops it. Return the kept episodes and their tasks,
    the count of each outcome and the hallucination statistics of all rollouts. A
    chain imagined by parts already passed the robustness check part by part."""
    stats = HallucinationStats()
    kept, kept_tasks, counts = [], [], {"generated": len(generated), "succeeded": 0, "non_finite": 0,
                                         "dropped_physics": 0, "dropped_failure": 0, "dropped_fragile": 0,
                                         "dropped_explain_back": 0}
    for number, (rollout, task, checked_per_part) in enumerate(zip(generated, tasks, by_parts)):
        violations = check_rollout(spec, rollout.states, rollout.actions)
        stats.add(violations)
        if not np.all(np.isfinite(rollout.states)) or len(rollout.actions) == 0:
            counts["non_finite"] += not np.all(np.isfinite(rollout.states))
            continue
        if config.physics_filter and not is_plausible(violations):
            counts["dropped_physics"] += 1
            continue
        episode, succeeded = label_rollout(spec, task, rollout.instruction, rollout.states, rollout.actions,
                                           config.reward)
        counts["succeeded"] += succeeded
        if succeeded and config.robust_noise > 0 and not checked_per_part and robust_success_share(
                task, episode.observations, step_scale, config.robust_noise,
                np.random.default_rng([config.seed, number])) < config.robust_share:
            counts["dropped_fragile"] += 1
            continue
        if not succeeded and not config.keep_failures:
            counts["dropped_failure"] += 1
            continue
        kept.append(episode)
        kept_tasks.append(task)
    return kept, kept_tasks, counts, stats
