"""Held-out metrics of a grounded model, computed from episodes only (no simulator).

- dynamics: MSE of predicted next states over held-out transitions, against the
  copy-the-state baseline (predict ``s' = s``);
- explanation: greedy instruction text for held-out trajectories, read back with
  ``spec.parse_instruction``; correct when it names the episode's task
  (``explanation_accuracy``: the same fields; ``explanation_equivalent``: the same
  goal, e.g. "blue right of red" for "red left of blue", see ``same_task``). A
  trajectory often achieves several tasks at once (in the CLEVR data about five
  relations turn true per successful episode, so naming the one the expert was given
  is partly a guess), so ``explanation_achieved`` also counts text whose task fails
  at the trajectory's first state and holds at its last: a true description;
- generation: rollouts from held-out start states and held-out phrasings; a rollout
  counts when its last state satisfies the task (the task's own predicate), generated
  by the plain loop of :mod:`kalm.grounding.decoding` (imagination has its own batched,
  KV-cached generator).
"""

from __future__ import annotations

import numpy as np
import torch

from kalm.data.hindsight import label_goals
from kalm.envs.spec import goal_key, same_task
from kalm.grounding.data import ExampleSampler, GroundingEpisode
from kalm.grounding.decoding import greedy_text, rollout, to_device
from kalm.grounding.dynamics_baseline import HELD_OUT_TRANSITIONS, held_out_transitions
from kalm.grounding.prompts import collate


@torch.no_grad()
def dynamics_mse(model, episodes: list[GroundingEpisode], batch_size: int = 64,
                 max_transitions: int = HELD_OUT_TRANSITIONS, seed: int = 0) -> dict:
    """Next-state error on held-out transitions: MSE (per coordinate) and the median
    per-transition L2 distance, each beside copying the state."""
    device = next(model.parameters()).device
    pairs = held_out_transitions(episodes, max_transitions, seed)
    model_err, copy_err, model_l2, copy_l2 = [], [], [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        examples = [model.prompts.dynamics(e.observations[t], e.actions[t], e.observations[t + 1]) for e, t in chunk]
        b = to_device(collate(examples, model.pad_token_id), device)
        hidden, _ = model(model.embed_sequence(b["input_ids"], b["states"], b["actions"]), b["attention_mask"],
                          b["position_ids"])
        m = b["state_mask"]
        pred = model.predict_state(hidden[m], b["state_reference"][m]).float()
        target = b["state_targets"][m].float()
        reference = b["state_reference"][m].float()
        model_err.append(((pred - target) ** 2).mean(-1).cpu())
        copy_err.append(((reference - target) ** 2).mean(-1).cpu())
        model_l2.append((pred - target).norm(dim=-1).cpu())
        copy_l2.append((reference - target).norm(dim=-1).cpu())
    mse, copy = float(torch.cat(model_err).mean()), float(torch.cat(copy_err).mean())
    return {"dynamics_mse": mse, "copy_baseline_mse": copy, "dynamics_improvement": copy / max(mse, 1e-12),
            "dynamics_median_l2": float(torch.cat(model_l2).median()),
            "copy_baseline_median_l2": float(torch.cat(copy_l2).median()),
            "dynamics_transitions": len(pairs)}


def explanation_accuracy(model, spec, sampler: ExampleSampler, batch_size: int = 32, max_new_tokens: int = 32,
                         max_episodes: int = 100) -> dict:
    episodes = sampler.successful[:max_episodes]
    correct, equivalent, achieved, samples = 0, 0, 0, []
    for i in range(0, len(episodes), batch_size):
        chunk = episodes[i : i + batch_size]
        windows = [sampler.explanation_window(e) for e in chunk]
        prompts = [model.prompts.explanation(*w, None) for w in windows]
        for ep, (obs, _), text in zip(chunk, windows, greedy_text(model, prompts, max_new_tokens)):
            parsed = spec.parse_instruction(text)
            ok = parsed is not None and parsed.to_json() == ep.task.to_json()
            correct += ok
            equivalent += parsed is not None and same_task(parsed, ep.task)
            achieved += parsed is not None and _in_scene(spec, parsed, ep.task) and parsed.success(obs[-1], obs[0]) \
                and not parsed.success(obs[0], obs[0])
            if len(samples) < 8:
                samples.append({"generated": text, "task": ep.task_json, "correct": bool(ok)})
    n = max(len(episodes), 1)
    return {"explanation_accuracy": correct / n, "explanation_equivalent": equivalent / n,
            "explanation_achieved": achieved / n,
            "explanation_episodes": len(episodes), **explanation_ambiguity(spec, sampler, episodes),
            "explanation_samples": samples}


def explanation_ambiguity(spec, sampler: ExampleSampler, episodes) -> dict:
    """How many training tasks each explained window achieves (false at its first state,
    true at its last), and the accuracy of naming one of them at random: exactly, and
    up to equivalence (one guess per distinct goal).

    Why: exact accuracy asks for *the* task the expert was given, but one trajectory
    often achieves several; this puts the measured accuracy next to what guessing
    among the achieved tasks would score. Only the goals the episode's scene holds count
    (``EnvSpec.scene_goals``): a Meta-World skill's test read in another skill's scene
    measures the wrong objects."""
    counts, chance, goals, goal_chance = [], [], [], []
    for ep in episodes:
        tasks = label_goals(spec, ep.task)
        obs, _ = sampler.explanation_window(ep)
        achieved = [t for t in tasks if t.success(obs[-1], obs[0]) and not t.success(obs[0], obs[0])]
        distinct = {goal_key(t) for t in achieved}
        counts.append(len(achieved))
        goals.append(len(distinct))
        hit = any(t.to_json() == ep.task.to_json() for t in achieved)
        chance.append(1.0 / len(achieved) if hit else 0.0)
        goal_chance.append(1.0 / len(distinct) if goal_key(ep.task) in distinct else 0.0)
    if not counts:
        return {}
    return {"explanation_tasks_achieved": float(np.mean(counts)),
            "explanation_chance_among_achieved": float(np.mean(chance)),
            "explanation_goals_achieved": float(np.mean(goals)),
            "explanation_equivalent_chance_among_achieved": float(np.mean(goal_chance))}


def _in_scene(spec, task, scene) -> bool:
    """Whether ``task`` can be achieved in ``scene``'s scene (every task can where scenes are alike)."""
    return spec.scene_goals is None or any(goal_key(t) == goal_key(task) for t in spec.scene_goals(scene))


def generation_success(model, sampler: ExampleSampler, max_steps: int, batch_size: int = 32,
                       max_episodes: int = 100, seed: int = 0) -> dict:
    episodes = sampler.successful[:max_episodes]
    rng = np.random.default_rng(seed)
    successes, lengths = [], []
    for i in range(0, len(episodes), batch_size):
        chunk = episodes[i : i + batch_size]
        texts = [sampler.phrasing(e, rng) for e in chunk]
        starts = np.stack([e.observations[0] for e in chunk])
        traj, n = rollout(model, texts, starts, max_steps)
        for e, states, k in zip(chunk, traj, n):
            successes.append(bool(e.task.success(states[k], states[0])))
            lengths.append(int(k))
    return {"generation_success": float(np.mean(successes)) if successes else 0.0,
            "generation_mean_length": float(np.mean(lengths)) if lengths else 0.0,
            "generation_episodes": len(successes)}


def determined_explanation(model, spec, episodes: list[GroundingEpisode], window: int, batch_size: int,
                           max_new_tokens: int, max_episodes: int) -> dict:
    """Explanation of held-out trajectories that achieved exactly one training goal
    (:mod:`kalm.data.hindsight`): each has one right description, so accuracy here is
    reading, not guessing among side effects."""
    sampler = ExampleSampler(model.prompts, episodes, window, validation=True)
    found = explanation_accuracy(model, spec, sampler, batch_size, max_new_tokens, max_episodes)
    # naming one of the goals the episode's scene holds at random
    chance = [1.0 / len({goal_key(t) for t in label_goals(spec, e.task)}) for e in sampler.successful[:max_episodes]]
    return {"determined_explanation_chance": float(np.mean(chance)) if chance else 0.0,
            "determined_explanation_accuracy": found["explanation_accuracy"],
            "determined_explanation_equivalent": found["explanation_equivalent"],
            "determined_explanation_episodes": found["explanation_episodes"],
            "determined_explanation_samples": found["explanation_samples"]}


def evaluate_grounding(model, spec, episodes: list[GroundingEpisode], *, bf16: bool, seed: int, window: int,
                       horizon: int, batch_size: int, max_episodes: int, max_new_tokens: int,
                       determined: list[GroundingEpisode] | None = None) -> dict:
    """Every held-out metric of a grounded model: dynamics on ``episodes``' transitions;
    explanation of windows of at most ``window`` steps and generation of rollouts of
    at most ``horizon`` steps, on up to ``max_episodes`` successful episodes; and, given
    ``determined`` episodes, explanation where the answer is unambiguous."""
    model.eval()
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16, enabled=bf16):
        metrics = dynamics_mse(model, episodes, seed=seed)
        if determined:
            metrics.update(determined_explanation(model, spec, determined, window, batch_size, max_new_tokens,
                                                  max_episodes))
        try:
            sampler = ExampleSampler(model.prompts, episodes, window, validation=True)
        except ValueError:
            return metrics  # no successful held-out episode: nothing to explain or generate
        metrics.update(explanation_accuracy(model, spec, sampler, batch_size, max_new_tokens, max_episodes))
        metrics.update(generation_success(model, sampler, horizon, batch_size, max_episodes, seed))
    return metrics
