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
from dataclasses import replace

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


def _time(model, texts, starts, config: GenerationConfig, repeats: int):
    """Median seconds of ``repeats`` generations, and the last one's rollouts."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_rollouts(model, texts, starts, config)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


# The cell the KV-cache target is stated for (T = 50, batch 8): its recompute baseline is
# always timed, whatever the budget.
HEADLINE = (50, 8)


def run(model, lengths: Sequence[int] = (10, 25, 50), batches: Sequence[int] = (1, 8, 32), repeats: int = 3,
        recompute_budget_s: float = 240.0) -> tuple[str, list[dict]]:
    """See :func:`_run`; gradients are off only inside (the offline benchmark that
    follows in the same process trains networks)."""
    with torch.no_grad():
        return _run(model, lengths, batches, repeats, recompute_budget_s)


def _run(model, lengths: Sequence[int], batches: Sequence[int], repeats: int,
         recompute_budget_s: float) -> tuple[str, list[dict]]:
    """A markdown table and the rows. The recompute baseline is skipped for a cell once
    the budget is spent (its time grows with T squared), except for :data:`HEADLINE`;
    the table says so."""
    rows, spent = [], 0.0
    for batch in batches:
        texts, starts = _prompts(batch)
        for steps in lengths:
            config = GenerationConfig(max_steps=steps, batch_size=batch, stop_on_done=False)
            cached_s, cached = _time(model, texts, starts, config, repeats)
            row = {"T": steps, "batch": batch, "cached_s": cached_s, "recompute_s": None, "speedup": None,
                   "equal": None, "tokens": 2 * steps * batch}
            if spent < recompute_budget_s or (steps, batch) == HEADLINE:
                start = time.perf_counter()
                full_s, full = _time(model, texts, starts, replace(config, use_cache=False),
                                     1 if steps * batch > 200 else repeats)
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


def run_shared_prefill(model, batch: int = 64, steps: int = 5, starts: Sequence[int] = (1, 4, 8),
                       repeats: int = 3) -> tuple[str, list[dict]]:
    """Rollouts/s when ``k`` rows share each instruction (rephrased CLEVR instructions,
    T = ``steps``, ``batch`` rows with their own start states), with and without the
    shared prefill, side by side on identical inputs; trajectories must agree."""
    with torch.no_grad():
        spec = get_spec("clevr")
        pool = [i.text for i in spec.levels["rephrase"](0)]
        env = spec.make_env()
        states = np.stack([env.reset(seed=i)[0] for i in range(batch)])
        rng = np.random.default_rng(0)
        rows = []
        for k in starts:
            drawn = [pool[int(rng.integers(len(pool)))] for _ in range(-(-batch // k))]
            texts = [t for t in drawn for _ in range(k)][:batch]
            timed = {share: _time(model, texts, states, GenerationConfig(
                max_steps=steps, batch_size=batch, stop_on_done=False, share_prefill=share), repeats)
                for share in (False, True)}
            equal = all(np.array_equal(a.actions, b.actions) and np.allclose(a.states, b.states, atol=1e-4)
                        for a, b in zip(timed[False][1], timed[True][1]))
            if not equal:
                raise AssertionError(f"shared and separate prefill disagree with {k} starts per instruction")
            rows.append({"k": k, "batch": batch, "T": steps, "separate_s": timed[False][0], "shared_s": timed[True][0]})
    lines = [f"## Shared prefill: k start states per instruction (batch {batch}, T = {steps}, rephrased instructions)",
             "", "| k | separate rollouts/s | shared rollouts/s | speed-up | same trajectories |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {batch / r['separate_s']:.1f} | {batch / r['shared_s']:.1f} | "
                     f"{r['separate_s'] / r['shared_s']:.2f}x | yes |")
    return "\n".join(lines), rows


def run_segment_order(model, prompts: int = 2000, batch: int = 64, steps: int = 3,
                      repeats: int = 1) -> tuple[str, list[dict]]:
    """The hard level's first segments (one training phrasing of each prompt's first
    part, drawn as :mod:`kalm.imagine.compose` draws them, from its own start state)
    generated in the order drawn and grouped by phrasing (what compose does, so that
    equal phrasings share a prefill), side by side on identical rows (greedy, the
    model's own precision). Greedy rows depend only on themselves, up to the padding's
    rounding; the table counts the rows whose actions agree."""
    from kalm.envs.spec import subgoals

    with torch.no_grad():
        spec = get_spec("clevr")
        rng = np.random.default_rng(0)
        hard = [ins for ins in spec.levels["hard"](0) if subgoals(ins.task)]
        firsts = [subgoals(hard[int(rng.integers(len(hard)))].task)[0] for _ in range(prompts)]
        texts = [spec.training_instruction(goal, rng) for goal in firsts]
        env = spec.make_env()
        starts = np.stack([env.reset(seed=i)[0] for i in range(prompts)])
        order = sorted(range(prompts), key=texts.__getitem__)
        config = GenerationConfig(max_steps=steps, batch_size=batch, stop_on_done=False)
        drawn_s, drawn = _time(model, texts, starts, config, repeats)
        grouped_s, grouped = _time(model, [texts[i] for i in order], starts[order], config, repeats)
    same = float(np.mean([np.array_equal(drawn[i].actions, grouped[k].actions) for k, i in enumerate(order)]))
    row = {"segments": prompts, "distinct": len(set(texts)), "batch": batch, "T": steps, "drawn_s": drawn_s,
           "grouped_s": grouped_s, "same_actions": same}
    lines = [f"## Hard segments in drawn order and grouped by phrasing ({prompts} segments, {row['distinct']} "
             f"phrasings, batch {batch}, T = {steps}, {model.inference_dtype})", "",
             "| drawn order segments/s | grouped segments/s | speed-up | rows with every action equal |",
             "|---|---|---|---|",
             f"| {prompts / drawn_s:.1f} | {prompts / grouped_s:.1f} | {drawn_s / grouped_s:.2f}x | {same:.0%} |"]
    return "\n".join(lines), [row]


def run_precision(model_fp32, batch: int = 64, steps: int = 5, rollouts: int = 128,
                  repeats: int = 3) -> tuple[str, list[dict]]:
    """Imagination-shaped generation (``rollouts`` rephrased prompts, T = ``steps``,
    batches of ``batch``) with the LLM body in fp32 and then in bf16, side by side in
    one process; the model is cast to bf16 in the course of it. Reports how many greedy
    rollouts keep every action and the largest state difference."""
    with torch.no_grad():
        texts, starts = _prompts(rollouts)
        config = GenerationConfig(max_steps=steps, batch_size=batch, stop_on_done=False)
        timed = {}
        for precision in ("fp32", "bf16"):
            model_fp32.use_inference_precision(precision)
            generate_rollouts(model_fp32, texts[:batch], starts[:batch], config)  # warm-up
            timed[precision] = _time(model_fp32, texts, starts, config, repeats)
    same = [np.array_equal(a.actions, b.actions) for a, b in zip(timed["fp32"][1], timed["bf16"][1])]
    gap = max((float(np.abs(a.states - b.states).max()) for a, b, s in zip(timed["fp32"][1], timed["bf16"][1], same)
               if s), default=float("nan"))
    row = {"rollouts": rollouts, "batch": batch, "T": steps, "fp32_s": timed["fp32"][0], "bf16_s": timed["bf16"][0],
           "same_actions": float(np.mean(same)), "max_state_gap_same_actions": gap}
    lines = [f"## Inference precision ({rollouts} rephrased prompts, batch {batch}, T = {steps}, greedy)", "",
             "| fp32 rollouts/s | bf16 rollouts/s | speed-up | rollouts with every action equal | largest state gap "
             "among those |", "|---|---|---|---|---|",
             f"| {rollouts / row['fp32_s']:.1f} | {rollouts / row['bf16_s']:.1f} "
             f"| {row['fp32_s'] / row['bf16_s']:.2f}x "
             f"| {row['same_actions']:.0%} | {gap:.3f} |"]
    return "\n".join(lines), [row]


def run_llm_policy(model, episodes_per_level: int = 8, batch: int = 64) -> tuple[str, list[dict]]:
    """The LLM as a policy in the real simulator (greedy, every level, ``episodes_per_level``
    each), one episode at a time and then in lockstep batches of ``batch``, side by side.
    The table says how many episodes the two scored differently (in bf16 a padded batch
    can flip a near-tie; in fp32 the tests require none)."""
    from kalm.evaluation.evaluate import evaluate, resolve_levels
    from kalm.imagine.llm_policy import LLMPolicy

    spec = get_spec("clevr")
    levels = resolve_levels(spec, "all", 1000)
    timed = {}
    for size in (1, batch):
        start = time.perf_counter()
        report = evaluate(LLMPolicy(model, batch_size=size), spec, levels, episodes_per_level, 1000, progress=False)
        timed[size] = (time.perf_counter() - start, report["results"])
    episodes = len(timed[1][1])
    differ = sum(a != b for a, b in zip(timed[1][1], timed[batch][1]))
    row = {"episodes": episodes, "batch": batch, "one_at_a_time_s": timed[1][0], "lockstep_s": timed[batch][0],
           "episodes_scored_differently": differ}
    lines = [f"## LLM as policy ({episodes} episodes in the simulator, {model.inference_dtype})", "",
             f"| one at a time | lockstep batches of {batch} | speed-up | episodes scored differently |",
             "|---|---|---|---|",
             f"| {row['one_at_a_time_s']:.1f} s | {row['lockstep_s']:.1f} s | "
             f"{row['one_at_a_time_s'] / row['lockstep_s']:.1f}x | {differ} of {episodes} |"]
    return "\n".join(lines), [row]
