"""One expert episode on a random instruction, rendered to a GIF (the smoke test a
new user runs first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kalm.envs import get_spec
from kalm.envs.clevr.render import save_gif


def run_demo(out: Path, seed: int = 0) -> str:
    spec = get_spec("clevr")
    rng = np.random.default_rng(seed)
    instruction = spec.levels["seen"](seed)[int(rng.integers(len(spec.levels["seen"](seed))))]
    env = spec.make_env(render_mode="rgb_array")
    expert = spec.make_expert(env)
    obs, info = env.reset(seed=seed, options={"task": instruction.task})
    frames = [env.render()]
    for _ in range(spec.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert(obs, instruction.task, env.unwrapped.start_state))
        frames.append(env.render())
        if terminated or truncated:
            break
    env.close()
    gif = save_gif(frames, Path(out) / "expert_episode.gif")
    verdict = "succeeded" if info["success"] else "did not succeed"
    return f"{instruction.text!r}: the expert {verdict} in {len(frames) - 1} pushes; GIF at {gif}"
