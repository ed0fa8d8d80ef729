"""How often an imagined success is a real one: replay imagined rollouts in the simulator.

An audit, not a filter. Imagined rollouts are labelled by the task predicate on the
*imagined* states (as the reference does); whether those labels hold is only known by
executing the same actions from the same start state in the real simulator. The result
goes into the report beside the hallucination statistics and never back into the
training data (that would be online interaction, which offline RL does not have).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kalm.data.episodes import EpisodeDataset
from kalm.envs.spec import EnvSpec

# An environment that cannot be reset to a given state (Meta-World resets from its own
# distribution) starts elsewhere; such rollouts are counted as not replayable.
_SAME_START_ATOL = 1e-4


def replay_imagined(spec: EnvSpec, dataset: EpisodeDataset | None) -> dict:
    """Replay every episode's actions from its first state; count real successes.

    Returns ``replayed`` (episodes whose start the simulator could reproduce),
    ``real_success`` and ``real_success_share`` (over replayed episodes, None if none),
    and ``not_replayable``.
    """
    episodes = dataset.episodes if dataset is not None else ()
    return replay_actions(spec, [(spec.parse_task(e.task), e.observations[0], e.actions) for e in episodes])


def replay_generated(spec: EnvSpec, attempts: Sequence[tuple], limit: int) -> dict:
    """:func:`replay_actions` on at most ``limit`` of ``attempts``, evenly spaced: how
    often the LLM's generated actions reach the goal in the real world, kept or not."""
    stride = max(1, -(-len(attempts) // limit)) if limit > 0 else 1
    return replay_actions(spec, list(attempts[::stride][:limit]))


def replay_actions(spec: EnvSpec, attempts: Sequence[tuple]) -> dict:
    """Execute each ``(task, start_state, actions)`` from its start in the simulator;
    count those whose task holds at some step (see :func:`replay_imagined`). In an
    environment with waypoints the actions end with its ``settle`` steps (a
    position-controlled hand arrives after its target does)."""
    env = spec.make_env()
    replayed = succeeded = not_replayable = 0
    try:
        for task, start, actions in attempts:
            obs, info = env.reset(seed=0, options={"task": task, "state": start})
            if not np.allclose(obs, start, atol=_SAME_START_ATOL):
                not_replayable += 1
                continue
            replayed += 1
            success = bool(info.get("success", False))
            if spec.waypoints is not None:
                actions = spec.waypoints.settle(actions)
            for action in actions:
                if success:
                    break
                obs, _, terminated, truncated, info = env.step(action)
                success = bool(info["success"])
                if terminated or truncated:
                    break
            succeeded += success
    finally:
        env.close()
    return {"replayed": replayed, "real_success": succeeded, "not_replayable": not_replayable,
            "real_success_share": succeeded / replayed if replayed else None}
