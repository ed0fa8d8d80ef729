"""CLEVR-Robot: push-steps/s (single, sync and async vector envs), resets/s, the scripted
expert's success per task kind, and physics fidelity against the original: its recorded
toy data, its public from-rest pushes, and its free-push lengths."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import gymnasium as gym
import numpy as np

from kalm.envs import get_spec
from kalm.envs.clevr.env import CLEVRRobotEnv
from kalm.envs.clevr.fidelity import free_push_lengths, replay_from_rest, replay_reference

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "clevr_robot_kalm_toy.npz"
PUBLIC_PUSHES = REFERENCE.with_name("clevr_physics_public.npz")


def push_rate(seconds: float = 3.0) -> float:
    env = CLEVRRobotEnv()
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, _terminated, _truncated, _ = env.step(int(rng.integers(40)))
        n += 1
        if n % 50 == 0:
            env.reset()
    return n / (time.perf_counter() - start)


def reset_rate(seconds: float = 3.0) -> float:
    """Resets/s on one core, each with a fresh seed (start sampling included)."""
    env = CLEVRRobotEnv()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed=n)
        n += 1
    return n / (time.perf_counter() - start)


def vector_rate(mode: str, num_envs: int = 4, steps: int = 300) -> float:
    envs = gym.make_vec("kalm/CLEVRRobot-v0", num_envs=num_envs, vectorization_mode=mode)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        envs.step(rng.integers(40, size=num_envs))
    rate = steps * num_envs / (time.perf_counter() - start)
    envs.close()
    return rate


def expert_success(episodes_per_kind: int = 40, seed: int = 0) -> dict[str, tuple[float, float, int]]:
    """Success rate, mean pushes, and episodes per task kind (instructions cycled)."""
    spec = get_spec("clevr")
    env = spec.make_env()
    expert = spec.make_expert(env)
    results: dict[str, list[tuple[bool, int]]] = defaultdict(list)
    rng = np.random.default_rng(seed)
    tasks_by_kind: dict[str, list] = defaultdict(list)
    for level in ("seen", "easy", "hard"):
        for task in dict.fromkeys(i.task for i in spec.levels[level](seed)):
            tasks_by_kind[task.kind].append(task)
    for kind, tasks in tasks_by_kind.items():
        for i in range(episodes_per_kind):
            task = tasks[i % len(tasks)]
            obs, info = env.reset(seed=int(rng.integers(2**31)), options={"task": task})
            for t in range(spec.max_episode_steps):  # noqa: B007 - t is read after the loop
                obs, _, terminated, truncated, info = env.step(expert(obs, task, env.unwrapped.start_state))
                if terminated or truncated:
                    break
            results[kind].append((info["success"], t + 1))
    return {
        k: (float(np.mean([s for s, _ in v])), float(np.mean([n for _, n in v])), len(v)) for k, v in results.items()
    }


def metaworld_rate(seconds: float = 3.0) -> float | None:
    """Meta-World steps/s with random actions (None when the extra is not installed)."""
    try:
        spec = get_spec("metaworld")
        env = spec.make_env()
    except ImportError:
        return None
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, size=4).astype(np.float32))
        n += 1
        if terminated or truncated:
            env.reset()
    env.close()
    return n / (time.perf_counter() - start)


def run(quick: bool = False) -> str:
    lines = ["## Environment (CLEVR-Robot, one process)", "", "| measurement | value |", "|---|---|"]
    lines.append(f"| push-steps/s, single env | {push_rate(1.0 if quick else 3.0):,.0f} |")
    lines.append(f"| resets/s, single env | {reset_rate(1.0 if quick else 3.0):,.0f} |")
    for mode in ("sync", "async"):
        lines.append(f"| push-steps/s, {mode} vector env x4 | {vector_rate(mode, steps=100 if quick else 300):,.0f} |")
    mw = metaworld_rate(1.0 if quick else 3.0)
    lines.append(f"| Meta-World steps/s, single env | {'not installed' if mw is None else f'{mw:,.0f}'} |")
    lines += ["", "| expert on task kind | success | mean pushes | episodes |", "|---|---|---|---|"]
    for kind, (rate, pushes, n) in expert_success(10 if quick else 40).items():
        lines.append(f"| {kind} | {rate:.1%} | {pushes:.1f} | {n} |")
    if REFERENCE.exists():
        lines += ["", "Physics fidelity (L2 error of the next 10-d state against the original):", ""]
        lines.append(replay_reference(REFERENCE).table())
    if PUBLIC_PUSHES.exists():
        rest = replay_from_rest(PUBLIC_PUSHES)
        lines += ["", f"The original's public from-rest pushes ({rest['pushes']}; a perfect copy scores 0): median "
                  f"{rest['median']:.4f}, p90 {rest['p90']:.4f}, {rest['exact']:.0%} within 1e-3.", "",
                  "| free push | original | here | pushes |", "|---|---|---|---|"]
        for kind, (original, ours, n) in free_push_lengths(PUBLIC_PUSHES).items():
            lines.append(f"| {kind} | {original:.4f} | {ours:.4f} | {n} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
