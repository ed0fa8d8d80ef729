"""Offline RL: gradient steps/s of d3rlpy algorithms at the default network sizes.

Each algorithm trains twice on the same data (a short and a longer run); the
difference removes set-up costs (loading the encoder, building the buffer). The
continuous algorithms (TD3+BC, IQL) join this table with the first continuous
environment.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from kalm.data.collect import collect_expert
from kalm.data.episodes import save_episodes
from kalm.envs import get_spec
from kalm.offline.config import TrainConfig
from kalm.offline.train import train


def steps_per_second(data: Path, config: TrainConfig, short: int = 100, long: int = 600) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        a = train(data, Path(tmp) / "a", replace(config, steps=short, checkpoint_every=short), progress=False)
        b = train(data, Path(tmp) / "b", replace(config, steps=long, checkpoint_every=long), progress=False)
    return (long - short) / max(b.seconds - a.seconds, 1e-9)


def run(episodes: int = 200) -> str:
    spec = get_spec("clevr")
    dataset = collect_expert(spec, episodes=episodes, seed=0, epsilon=0.1, reward="sparse", progress=False)
    lines = ["## Offline RL (d3rlpy, MLP 256-256, one torch thread, CLEVR-Robot data)", "",
             "| algorithm | batch | steps/s |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        data = save_episodes(dataset, Path(tmp) / "d.h5")
        for algo in ("bc", "cql"):
            config = TrainConfig(algo=algo).for_action_space(spec.discrete)
            lines.append(f"| {algo} (discrete) | {config.resolved_batch_size()} | {steps_per_second(data, config):.0f} |")
    return "\n".join(lines)
