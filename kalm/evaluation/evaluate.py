"""Success rates of a policy in the real simulator, per level and per task kind.

Episodes are planned before any policy runs, from the seed alone: for a level, the
tasks are visited in a seeded random order, cycling so every task is used equally
often (ImagineBench's round-robin was uneven across tasks, kalm-reference §9.13), each
episode with one of its phrasings and a start state drawn from the seed. Every policy
evaluated with the same seed therefore faces exactly the same episodes, so trained,
random and expert rows are paired comparisons, and a rerun reproduces its numbers.

A start in which the task already holds would count as a success without any action;
such starts are redrawn (deterministically) as in data collection.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kalm.envs.spec import EnvSpec, Instruction
from kalm.evaluation.policies import BatchEvalPolicy, EvalPolicy
from kalm.evaluation.stats import wilson_interval
from kalm.parallel import gather_in_order, process_group, shard

LEVEL_NAMES = ("seen", "rephrase", "easy", "hard")
_MAX_START_TRIES = 100


@dataclass(frozen=True)
class PlannedEpisode:
    """One episode to run: its instruction and the reset seeds to try, in order, until
    the task does not already hold; or a fixed ``start_state`` (used as it is), e.g.
    the first state of an imagined rollout."""

    level: str
    index: int
    instruction: Instruction
    reset_seeds: tuple[int, ...]
    start_state: np.ndarray | None = None


@dataclass(frozen=True)
class EpisodeResult:
    level: str
    index: int
    instruction: str
    task: dict
    kind: str
    success: bool
    steps: int


def _level_rng(seed: int, level: str) -> np.random.Generator:
    # crc32, not hash(): Python salts string hashes per process.
    return np.random.default_rng([seed, zlib.crc32(level.encode("utf-8"))])


def plan_episodes(level: str, instructions: Sequence[Instruction], episodes: int, seed: int) -> list[PlannedEpisode]:
    """The episodes of one level: tasks balanced, phrasings and starts from the seed."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if not instructions:
        raise ValueError(f"level {level!r} has no instructions")
    by_task: dict[str, list[Instruction]] = {}
    for ins in instructions:
        by_task.setdefault(json.dumps(ins.task.to_json(), sort_keys=True), []).append(ins)
    groups = list(by_task.values())
    rng = _level_rng(seed, level)
    order: list[int] = []
    while len(order) < episodes:
        order.extend(int(i) for i in rng.permutation(len(groups)))
    planned = []
    for index, group_index in enumerate(order[:episodes]):
        group = groups[group_index]
        instruction = group[int(rng.integers(len(group)))]
        reset_seeds = tuple(int(s) for s in rng.integers(2**31, size=_MAX_START_TRIES))
        planned.append(PlannedEpisode(level, index, instruction, reset_seeds))
    return planned


def _reset_to_start(env, planned: PlannedEpisode) -> np.ndarray:
    """Reset ``env`` to the episode's fixed start, or else to its first start in which
    its task does not yet hold."""
    task = planned.instruction.task
    if planned.start_state is not None:
        obs, _ = env.reset(seed=planned.reset_seeds[0], options={"task": task, "state": planned.start_state})
        return np.asarray(obs)
    for reset_seed in planned.reset_seeds:
        obs, info = env.reset(seed=reset_seed, options={"task": task})
        if not info["success"]:
            return np.asarray(obs)
    raise RuntimeError(f"no start in {_MAX_START_TRIES} tries where {task.to_json()} does not already hold")


def _result(planned: PlannedEpisode, success: bool, steps: int) -> EpisodeResult:
    task = planned.instruction.task
    return EpisodeResult(level=planned.level, index=planned.index, instruction=planned.instruction.text,
                         task=task.to_json(), kind=task.kind, success=success, steps=steps)


def _episode_rng(planned: PlannedEpisode) -> np.random.Generator:
    """The generator a policy draws from in this episode (sampled actions, ε coins)."""
    return np.random.default_rng(planned.reset_seeds[-1])


def run_episode(env, spec: EnvSpec, policy: EvalPolicy, planned: PlannedEpisode,
                trajectory: list | None = None) -> EpisodeResult:
    """Run one planned episode until success, termination or the horizon; the
    observations it sees (the start included) are appended to ``trajectory`` if given."""
    obs = _reset_to_start(env, planned)
    record = trajectory.append if trajectory is not None else (lambda obs: None)
    record(obs)
    act = policy.begin(env, planned.instruction, obs, _episode_rng(planned))
    success, steps = False, 0
    for steps in range(1, spec.max_episode_steps + 1):  # noqa: B007 - the count is read after the loop
        obs, _, terminated, truncated, info = env.step(act(obs))
        record(obs)
        if info["success"]:
            success = True
            break
        if terminated or truncated:
            break
    return _result(planned, success, steps)


def run_lockstep(envs: Sequence, spec: EnvSpec, policy: BatchEvalPolicy,
                 plans: Sequence[PlannedEpisode]) -> list[EpisodeResult]:
    """The episodes of ``plans`` (one per env), stepped together: the policy chooses
    every running episode's action in one call. Each episode starts, stops and is
    scored exactly as :func:`run_episode` would run it alone."""
    if len(envs) != len(plans):
        raise ValueError(f"run_lockstep needs one env per episode, got {len(envs)} envs for {len(plans)} episodes")
    observations = np.stack([_reset_to_start(env, planned) for env, planned in zip(envs, plans)])
    act = policy.begin_batch([p.instruction for p in plans], observations, [_episode_rng(p) for p in plans])
    running = np.ones(len(plans), dtype=bool)
    success = np.zeros(len(plans), dtype=bool)
    steps = np.zeros(len(plans), dtype=np.int64)
    for step in range(1, spec.max_episode_steps + 1):
        actions = act(observations, running)
        for i in np.flatnonzero(running):
            obs, _, terminated, truncated, info = envs[i].step(actions[i])
            observations[i], steps[i] = obs, step
            if info["success"]:
                success[i], running[i] = True, False
            elif terminated or truncated:
                running[i] = False
        if not running.any():
            break
    return [_result(planned, bool(ok), int(n)) for planned, ok, n in zip(plans, success, steps)]


def _rate(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    n = len(results)
    k = sum(r.success for r in results)
    low, high = wilson_interval(k, n)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else 0.0, "ci95": [low, high]}


def summarise(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Per level: the overall rate and one rate per task kind, each with a Wilson CI."""
    levels: dict[str, Any] = {}
    for level in dict.fromkeys(r.level for r in results):
        rows = [r for r in results if r.level == level]
        kinds = {kind: _rate([r for r in rows if r.kind == kind]) for kind in sorted({r.kind for r in rows})}
        levels[level] = {**_rate(rows), "by_kind": kinds}
    return levels


def resolve_levels(spec: EnvSpec, level: str, seed: int) -> dict[str, list[Instruction]]:
    """``seen``/``rephrase``/``easy``/``hard`` or ``all`` -> instructions per level."""
    names = list(spec.levels) if level == "all" else [level]
    unknown = [n for n in names if n not in spec.levels]
    if unknown:
        raise ValueError(f"unknown level {unknown[0]!r} for {spec.name} (use {', '.join(spec.levels)} or all)")
    return {name: list(spec.levels[name](seed)) for name in names}


def planned_texts(spec: EnvSpec, episodes: int, seed: int) -> list[str]:
    """The instruction of every episode :func:`evaluate` runs on all levels with this
    seed and episode count, in plan order."""
    return [p.instruction.text for name, ins in resolve_levels(spec, "all", seed).items()
            for p in plan_episodes(name, ins, episodes, seed)]


def evaluate(
    policy: EvalPolicy,
    spec: EnvSpec,
    levels: dict[str, Sequence[Instruction]],
    episodes: int,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``episodes`` episodes per level and return the results as JSON-ready data.

    A policy with ``begin_batch`` runs ``batch_size`` episodes at a time in lockstep
    (:func:`run_lockstep`), with the same results as one at a time. Under ``accelerate
    launch`` with N processes each runs every N-th planned episode and every process
    returns all the results, in plan order (:mod:`kalm.parallel`)."""
    index, count = process_group()
    plans = shard([p for name, ins in levels.items() for p in plan_episodes(name, ins, episodes, seed)], index, count)
    batch = getattr(policy, "batch_size", 1) if hasattr(policy, "begin_batch") else 1
    envs, results = [], []
    try:
        envs += [spec.make_env() for _ in range(max(1, min(batch, len(plans))))]
        with tqdm(total=len(plans), desc=f"evaluate {policy.name}", unit="ep", disable=not progress or index) as bar:
            for start in range(0, len(plans), len(envs)):
                chunk = plans[start : start + len(envs)]
                if batch > 1:
                    results += run_lockstep(envs[: len(chunk)], spec, policy, chunk)
                else:
                    results.append(run_episode(envs[0], spec, policy, chunk[0]))
                bar.update(len(chunk))
    finally:
        for env in envs:
            env.close()
    results = gather_in_order(results, index, count)
    return {
        "policy": policy.name,
        "env": spec.name,
        "seed": seed,
        "episodes_per_level": episodes,
        "levels": summarise(results),
        "results": [asdict(r) for r in results],
    }


def evaluate_policy(policy: str | Path | EvalPolicy | None = None, *, baseline: str | None = None,
                    env: str | None = None, level: str = "all", tasks: str | Path | None = None,
                    episodes: int = 100, seed: int = 0, epsilon: float = 0.0, temperature: float = 0.0,
                    embedding_cache: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Success rates of a policy in the real simulator: ``policy`` is a directory written
    by ``kalm train`` (or any :class:`EvalPolicy`), or ``baseline`` names a reference
    policy (``random``, ``expert``, with ``env``). Evaluates ``episodes`` per level
    (``level``: one of the env's levels, or ``all``) or on a JSON-lines ``tasks`` file.

    Returns the JSON-ready results; ``["levels"][level]["success_rate"]`` is a rate."""
    from kalm.envs import get_spec
    from kalm.envs.task_file import read_task_file
    from kalm.evaluation.policies import make_policy
    from kalm.threads import set_torch_threads

    set_torch_threads(1)  # tiny networks; see kalm.offline.train
    if policy is None or isinstance(policy, (str, Path)):
        policy, env = make_policy(None if policy is None else Path(policy), baseline, env, embedding_cache, epsilon,
                                  temperature)
    elif env is None:
        raise ValueError("evaluating a policy object needs env")
    spec = get_spec(env)
    if tasks is not None:
        tasks = Path(tasks)
        levels = {f"tasks:{tasks.name}": read_task_file(tasks, spec.parse_task)}
    else:
        levels = resolve_levels(spec, level, seed)
    report = evaluate(policy, spec, levels, episodes, seed, progress=progress)
    report["epsilon"] = epsilon
    report["temperature"] = temperature
    if tasks is not None:
        report["task_file"] = str(tasks)
    return report
