"""Imaginary-rollout generation: KV-cached batched generation against the reference
approach of re-running the whole sequence at every step.

Both run the same model on the same prompts (greedy, fp32, the done signal ignored so
every rollout has exactly T steps); the trajectories must agree before any time is
reported. Times are medians over repeats, measured side by side in one process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np
import torch

from kalm.envs import get_spec
from kalm.imagine.generate import GenerationConfig, generate_rollouts


def build_model(llm: str = "smollm2", model_dir: str | None = None):
    """A grounded model: a trained checkpoint if given, else fresh I/O layers on the
    backbone (generation speed does not depend on what the layers learned). LoRA is
    merged into the backbone, as the imagination stage does."""
    from kalm.grounding.model import GroundedLM, GroundedLMConfig, NormStats

    spec = get_spec("clevr")
    if model_dir:
        return GroundedLM.load(model_dir, spec).merge_lora()
    config = GroundedLMConfig(env=spec.name, state_dim=spec.state_dim, action_dim=spec.action_dim,
                              discrete=spec.discrete, backbone=llm)
    stats = NormStats.identity(spec.state_dim, spec.action_dim, spec.discrete)
    return GroundedLM.create(config, stats).float().merge_lora()


def _prompts(batch: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    spec = get_spec("clevr")
    instructions = [i.text for i in spec.levels["rephrase"](seed)]
    env = spec.make_env()
    starts = np.stack([env.reset(seed=seed + i)[0] for i in range(batch)])
    rng = np.random.default_rng(seed)
    return [instructions[int(rng.integers(len(instructions)))] for _ in range(batch)], starts


def _time(model, texts, starts, steps: int, use_cache: bool, repeats: int):
    config = GenerationConfig(max_steps=steps, batch_size=len(texts), use_cache=use_cache, stop_on_done=False)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_rollouts(model, texts, starts, config)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(model, lengths: Sequence[int] = (10, 25, 50), batches: Sequence[int] = (1, 8, 32), repeats: int = 3,
        recompute_budget_s: float = 240.0) -> tuple[str, list[dict]]:
    """See :func:`_run`; gradients are off only inside (the offline benchmark that
    follows in the same process trains networks)."""
    with torch.no_grad():
        return _run(model, lengths, batches, repeats, recompute_budget_s)


def _run(model, lengths: Sequence[int], batches: Sequence[int], repeats: int,
         recompute_budget_s: float) -> tuple[str, list[dict]]:
    """A markdown table and the rows. The recompute baseline is skipped for a cell once
    the budget is spent (its time grows with T squared); the table says so."""
    rows, spent = [], 0.0
    for batch in batches:
        texts, starts = _prompts(batch)
        for steps in lengths:
            cached_s, cached = _time(model, texts, starts, steps, True, repeats)
            row = {"T": steps, "batch": batch, "cached_s": cached_s, "recompute_s": None, "speedup": None,
                   "equal": None, "tokens": 2 * steps * batch}
            if spent < recompute_budget_s:
                start = time.perf_counter()
                full_s, full = _time(model, texts, starts, steps, False, 1 if steps * batch > 200 else repeats)
                spent += time.perf_counter() - start
                row["equal"] = all(np.array_equal(a.actions, b.actions) and np.allclose(a.states, b.states, atol=1e-4)
                                   for a, b in zip(cached, full))
                if not row["equal"]:
                    raise AssertionError(f"cached and recomputed generation disagree at T={steps}, batch={batch}")
                row.update(recompute_s=full_s, speedup=full_s / cached_s)
            rows.append(row)
    lines = ["## Imaginary-rollout generation (greedy, fp32; tokens = state + action placeholders)", "",
             "| T | batch | cached rollouts/s | cached tokens/s | recompute rollouts/s | recompute tokens/s | "
             "speed-up | same trajectories |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = ("skipped (budget)", "–", "–", "–") if r["recompute_s"] is None else (
            f"{r['batch'] / r['recompute_s']:.2f}", f"{r['tokens'] / r['recompute_s']:.0f}", f"{r['speedup']:.1f}x",
            "yes" if r["equal"] else "NO")
        lines.append(f"| {r['T']} | {r['batch']} | {r['batch'] / r['cached_s']:.2f} | {r['tokens'] / r['cached_s']:.0f}"
                     f" | {rec[0]} | {rec[1]} | {rec[2]} | {rec[3]} |")
    return "\n".join(lines), rows
