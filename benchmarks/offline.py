"""Offline RL: gradient steps/s of d3rlpy algorithms at the default network sizes, and
episodes/s of evaluating a trained policy one episode at a time against in lockstep.

Each algorithm trains twice on the same data (a short and a longer run); the
difference removes set-up costs (loading the encoder, building the buffer). Discrete
algorithms run on CLEVR-Robot data; the continuous ones on Meta-World data when that
extra is installed. The Decision Transformer's batch is of 5-step episode slices.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from kalm.data.collect import collect_expert
from kalm.data.episodes import save_episodes
from kalm.envs import get_spec
from kalm.evaluation.evaluate import evaluate, resolve_levels
from kalm.evaluation.policies import TrainedPolicy
from kalm.offline.config import TrainConfig, algos_for
from kalm.offline.train import train


def steps_per_second(data: Path, config: TrainConfig, short: int = 100, long: int = 600) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        a = train(data, Path(tmp) / "a", replace(config, steps=short, checkpoint_every=short), progress=False)
        b = train(data, Path(tmp) / "b", replace(config, steps=long, checkpoint_every=long), progress=False)
    return (long - short) / max(b.seconds - a.seconds, 1e-9)


def _rows(env: str, algos: tuple[str, ...], episodes: int, tmp: Path) -> list[str]:
    spec = get_spec(env)
    dataset = collect_expert(spec, episodes=episodes, seed=0, epsilon=0.1, reward="sparse", progress=False)
    data = save_episodes(dataset, tmp / f"{env}.h5")
    kind = "discrete" if spec.discrete else "continuous"
    rows = []
    for algo in algos:
        config = TrainConfig(algo=algo).for_action_space(spec.discrete)
        # continuous actor-critics are 10-100x slower per step (CQL samples actions for
        # its penalty): fewer steps keep the whole benchmark within its 15 minutes
        short, long = (100, 600) if spec.discrete or algo == "bc" else (20, 120)
        rows.append(f"| {algo} ({kind}, {env}) | {config.resolved_batch_size()} | "
                    f"{steps_per_second(data, config, short, long):.0f} |")
    return rows


class _OneAtATime:
    """A trained policy without ``begin_batch``: evaluation runs its episodes alone."""

    def __init__(self, policy: TrainedPolicy):
        self.name, self.begin = policy.name, policy.begin


def evaluation_rows(data: Path, tmp: Path, episodes: int) -> list[str]:
    """A BC policy sampling at temperature 3 (the pipeline's setting) on every level,
    one episode at a time and in lockstep, alternately in this process."""
    spec = get_spec("clevr")
    train(data, tmp / "bc", TrainConfig(algo="bc", steps=300, checkpoint_every=300), progress=False)
    policy = TrainedPolicy(tmp / "bc", temperature=3.0)
    levels = resolve_levels(spec, "all", 0)
    evaluate(policy, spec, levels, 2, 0, progress=False)  # encode the instructions before timing
    seconds: dict[str, list[float]] = {"one at a time": [], "lockstep": []}
    results = {}
    for _ in range(2):
        for name, runner in (("one at a time", _OneAtATime(policy)), ("lockstep", policy)):
            start = time.perf_counter()
            results[name] = evaluate(runner, spec, levels, episodes, 0, progress=False)["results"]
            seconds[name].append(time.perf_counter() - start)
    same = "the same" if results["one at a time"] == results["lockstep"] else "DIFFERENT"
    total = episodes * len(levels)
    alone = min(seconds["one at a time"])
    return [f"| {name} | {total} | {total / min(s):.0f} | {alone / min(s):.2f}x |" for name, s in seconds.items()] + [
        f"\nBoth ways give {same} episode results."]


def run(episodes: int = 200) -> str:
    lines = ["## Offline RL (d3rlpy, MLP 256-256 or the DT's 2 layers 128 wide, one torch thread)", "",
             "| algorithm | batch | steps/s |", "|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        lines += _rows("clevr", algos_for(True), episodes, Path(tmp))
        try:
            get_spec("metaworld").make_env().close()
        except ImportError:
            lines.append("| continuous algorithms | – | Meta-World extra not installed |")
        else:
            lines += _rows("metaworld", algos_for(False), max(episodes // 10, 10), Path(tmp))
        lines += ["", "## Evaluating a trained policy (BC at temperature 3, CLEVR-Robot, every level, one core)", "",
                  "| episodes run | episodes | episodes/s | vs one at a time |", "|---|---|---|---|"]
        lines += evaluation_rows(Path(tmp) / "clevr.h5", Path(tmp), max(episodes // 2, 25))
    return "\n".join(lines)
