"""What ``kalm evaluate`` does, kept out of the CLI shell so it is testable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kalm.envs import get_spec
from kalm.envs.task_file import read_task_file
from kalm.evaluation.evaluate import evaluate, resolve_levels
from kalm.evaluation.policies import EvalPolicy, ExpertPolicy, RandomPolicy, TrainedPolicy
from kalm.evaluation.tables import write_results

BASELINES = ("random", "expert")


def make_policy(
    policy_dir: Path | None,
    baseline: str | None,
    env: str | None,
    embedding_cache: Path | None = None,
    epsilon: float = 0.0,
) -> tuple[EvalPolicy, str]:
    """The policy to evaluate and its environment's name."""
    if (policy_dir is None) == (baseline is None):
        raise ValueError("give exactly one of --policy DIR and --baseline random|expert")
    if policy_dir is not None:
        trained = TrainedPolicy(policy_dir, embedding_cache, epsilon)
        if env is not None and env != trained.env:
            raise ValueError(f"the policy was trained on {trained.env!r}, not {env!r}")
        return trained, trained.env
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r} (use {' or '.join(BASELINES)})")
    if env is None:
        raise ValueError("--baseline needs --env")
    spec = get_spec(env)
    return (RandomPolicy(spec) if baseline == "random" else ExpertPolicy(spec)), env


def run_evaluation(
    policy_dir: Path | None,
    baseline: str | None,
    env: str | None,
    level: str,
    tasks: Path | None,
    episodes: int,
    seed: int,
    out: Path | None,
    embedding_cache: Path | None = None,
    epsilon: float = 0.0,
) -> tuple[dict[str, Any], Path]:
    from kalm.threads import set_torch_threads

    set_torch_threads(1)  # tiny networks; see kalm.offline.train
    policy, env_name = make_policy(policy_dir, baseline, env, embedding_cache, epsilon)
    spec = get_spec(env_name)
    if tasks is not None:
        levels = {f"tasks:{tasks.name}": read_task_file(tasks, spec.parse_task)}
    else:
        levels = resolve_levels(spec, level, seed)
    report = evaluate(policy, spec, levels, episodes, seed)
    report["epsilon"] = epsilon
    if tasks is not None:
        report["task_file"] = str(tasks)
    if out is None:
        suffix = "" if epsilon == 0 else f"-eps{epsilon:g}"
        name = f"{tasks.stem if tasks is not None else level}-seed{seed}{suffix}.json"
        out = (policy_dir / "evaluation" / name) if policy_dir is not None else Path("runs/eval") / f"{baseline}-{name}"
    json_path, _ = write_results(report, out)
    return report, json_path
