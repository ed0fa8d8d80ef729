"""Imagined rollouts beside a trained policy's real execution of the same instruction
from the same start state: the report's "imagined vs real" pictures.

Each episode runs through the evaluation loop (:func:`kalm.evaluation.evaluate.run_episode`),
so it starts, stops and is scored as evaluation scores it. This stage draws the GIFs
itself because the report reads files only and never touches an environment.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kalm.data.episodes import Episode
from kalm.envs.spec import EnvSpec, Instruction
from kalm.evaluation.evaluate import PlannedEpisode, run_episode
from kalm.evaluation.policies import EvalPolicy
from kalm.files import write_atomic

FRAME = 192  # pixels per side of each half of a GIF frame


def write_showcase(spec: EnvSpec, policy: EvalPolicy, episodes: Sequence[Episode], out_dir: Path) -> list[dict]:
    """Replay each imagined episode's instruction with ``policy`` from its first state;
    writes ``showcase.json`` (the rows returned) and ``showcase_<i>.gif`` into ``out_dir``."""
    env = spec.make_env()
    rows = []
    try:
        for index, episode in enumerate(episodes):
            instruction = Instruction(episode.instruction, spec.parse_task(episode.task))
            planned = PlannedEpisode("showcase", index, instruction, reset_seeds=(0,),
                                     start_state=episode.observations[0])
            states: list[np.ndarray] = []
            result = run_episode(env, spec, policy, planned, trajectory=states)
            row = {"instruction": episode.instruction, "imagined": episode.observations.tolist(),
                   "imagined_success": bool(episode.terminated), "real": np.stack(states).tolist(),
                   "real_success": result.success, "gif": f"showcase_{index}.gif"}
            # drawn from the stored values, so a GIF is what the JSON says
            draw_side_by_side(spec, np.asarray(row["imagined"]), np.asarray(row["real"]), out_dir / row["gif"])
            rows.append(row)
    finally:
        env.close()
    (out_dir / "showcase.json").write_text(json.dumps(rows))
    return rows


def draw_side_by_side(spec: EnvSpec, imagined: np.ndarray, real: np.ndarray, path: Path) -> None:
    """A GIF whose frame ``t`` shows imagined state ``t`` left and real state ``t`` right
    (the shorter rollout holds its last state)."""
    from PIL import Image

    frames = []
    for t in range(max(len(imagined), len(real))):
        i, r = min(t, len(imagined) - 1), min(t, len(real) - 1)
        left = spec.render_state(imagined[i], FRAME, f"imagined, step {i}")
        right = spec.render_state(real[r], FRAME, f"policy in sim, step {r}")
        frames.append(np.concatenate([left, np.full((FRAME, 6, 3), 255, np.uint8), right], axis=1))
    images = [Image.fromarray(f) for f in frames]
    write_atomic(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:] or None,
                                                duration=600, loop=0))
