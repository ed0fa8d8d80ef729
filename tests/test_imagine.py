"""Imagined rollouts: KV-cached generation agrees with recomputation, actions are read
at the right position, labelling and hallucination checks behave."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from kalm.envs import get_spec
from kalm.envs.clevr.tasks import Relation
from kalm.grounding.model import GroundedLM, GroundedLMConfig, NormStats
from kalm.imagine.filters import HallucinationStats, check_rollout
from kalm.imagine.generate import GenerationConfig, carry_state, generate_rollouts
from kalm.imagine.label import label_rollout
from kalm.imagine.rollouts import ImagineConfig, imagine, sample_prompts


def _tiny_grounded(backbone) -> GroundedLM:
    """A grounded model on the tiny random backbone (seeded, fp32)."""
    torch.manual_seed(0)
    spec = get_spec("clevr")
    grounded = GroundedLMConfig(env="clevr", state_dim=spec.state_dim, action_dim=spec.action_dim, discrete=True,
                                backbone=str(backbone), finetune="full")
    identity = NormStats.identity(spec.state_dim, spec.action_dim, True)
    stats = NormStats(np.zeros(10, np.float32), np.full(10, 0.3, np.float32), np.full(10, 0.05, np.float32),
                      identity.action_mean, identity.action_std)
    return GroundedLM.create(grounded, stats).eval()


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    return _tiny_grounded(tiny_backbone)


def _starts(n, seed=0):
    env = get_spec("clevr").make_env()
    return np.stack([env.reset(seed=seed + i)[0] for i in range(n)])


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cached_generation_matches_recomputation(tiny_model, batch_size):
    instructions = ["Push the red ball to the left of the blue ball", "Move the cyan ball behind the green ball",
                    "Is the purple ball in front of the red ball"]
    starts = _starts(3)
    base = {"max_steps": 8, "batch_size": batch_size, "stop_on_done": False}
    cached = generate_rollouts(tiny_model, instructions, starts, GenerationConfig(use_cache=True, **base))
    full = generate_rollouts(tiny_model, instructions, starts, GenerationConfig(use_cache=False, **base))
    for a, b in zip(cached, full):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_allclose(a.states, b.states, atol=1e-4)
        assert a.states.shape == (9, 10) and a.actions.shape == (8,)


def test_batching_and_left_padding_do_not_change_a_rollout(tiny_model):
    instructions = ["Push the red ball left", "Can you help me keep the green ball to the right of the purple ball"]
    starts = _starts(2, seed=7)
    config = GenerationConfig(max_steps=6, stop_on_done=False)
    together = generate_rollouts(tiny_model, instructions, starts, config)
    alone = [generate_rollouts(tiny_model, [i], s[None], config)[0] for i, s in zip(instructions, starts)]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_allclose(a.states, b.states, atol=1e-4)


def test_rows_sharing_an_instruction_share_its_prefill_without_changing_a_rollout(tiny_model, monkeypatch):
    """Four start states for each of two instructions (of different lengths, so the
    shared prefixes are left-padded): the same rollouts as one row at a time, and
    the distinct prompts are what gets prefilled."""
    from kalm.imagine import generate

    instructions = ["Push the red ball left"] * 4 + ["Can you help me keep the green ball right of the cyan ball"] * 4
    starts = _starts(8, seed=11)
    config = GenerationConfig(max_steps=5, stop_on_done=False)
    prefilled = []
    real_start_shared = generate.CachedSequence.start_shared

    def spy(self, rows, initial_states):
        prefilled.append(self.prompt_embeds.shape[0])
        return real_start_shared(self, rows, initial_states)

    monkeypatch.setattr(generate.CachedSequence, "start_shared", spy)
    shared = generate_rollouts(tiny_model, instructions, starts, config)
    assert prefilled == [2]
    alone = [generate_rollouts(tiny_model, [i], s[None], config)[0] for i, s in zip(instructions, starts)]
    unshared = generate_rollouts(tiny_model, instructions, starts, GenerationConfig(max_steps=5, stop_on_done=False,
                                                                                    share_prefill=False))
    assert prefilled == [2]
    recomputed = generate_rollouts(tiny_model, instructions, starts, GenerationConfig(max_steps=5, stop_on_done=False,
                                                                                      use_cache=False))
    for a, b, c, d in zip(shared, alone, recomputed, unshared):
        np.testing.assert_array_equal(a.actions, d.actions)
        np.testing.assert_allclose(a.states, d.states, atol=1e-4)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.actions, c.actions)
        np.testing.assert_allclose(a.states, b.states, atol=1e-4)
        np.testing.assert_allclose(a.states, c.states, atol=1e-4)
    assert len({tuple(r.actions) for r in shared[:4]}) > 1 or len({r.states[1].tobytes() for r in shared[:4]}) > 1


def test_bf16_inference_casts_the_llm_body_only_and_keeps_the_rollouts_close(tiny_backbone, tmp_path):
    """A fresh model (the shared fixture stays fp32): in bf16 the transformer runs in
    bf16, the I/O layers stay fp32, the first imagined step stays close to fp32's, and
    the cast model refuses to be saved or cast back."""
    model = _tiny_grounded(tiny_backbone)
    starts, instructions = _starts(4, seed=2), ["Push the red ball left", "Move the cyan ball behind the green ball"] * 2
    config = GenerationConfig(max_steps=1, stop_on_done=False)
    fp32 = generate_rollouts(model, instructions, starts, config)
    assert model.use_inference_precision("fp32") is model and model.inference_dtype == torch.float32
    model.use_inference_precision("bf16")
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.io.parameters()} == {torch.float32}
    bf16 = generate_rollouts(model, instructions, starts, config)
    agree = [np.array_equal(a.actions, b.actions) for a, b in zip(fp32, bf16)]
    assert sum(agree) >= 3
    for a, b, same in zip(fp32, bf16, agree):
        if same:
            np.testing.assert_allclose(a.states, b.states, atol=0.02)
    with pytest.raises(ValueError, match="bf16"):
        model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="load it again"):
        model.use_inference_precision("fp32")
    with pytest.raises(ValueError, match="precision"):
        model.use_inference_precision("fp16")


def test_action_t_is_read_at_the_position_of_state_t(tiny_model):
    """Recompute by hand: a_t must come from the hidden state at the s_t placeholder
    of the sequence [prompt, s_0, a_0, s_1, ...], not from the pass that made s_t."""
    model = tiny_model
    instruction, start = "Push the red ball to the left of the blue ball", _starts(1, seed=3)
    out = generate_rollouts(model, [instruction], start, GenerationConfig(max_steps=4, stop_on_done=False))[0]
    prompt = model.build_generation_prompt([instruction], start)
    embeds = model.embed_sequence(prompt["input_ids"], prompt["states"], prompt["actions"])
    with torch.no_grad():
        for t in range(4):
            hidden, _ = model(embeds)
            assert int(model.predict_action(hidden[:, -1]).argmax(-1)) == out.actions[t]
            a = torch.as_tensor(out.actions[t : t + 1])
            embeds = torch.cat([embeds, model.embed_actions(a)], dim=1)
            hidden, _ = model(embeds)
            state = model.predict_state(hidden[:, -1], torch.as_tensor(out.states[t : t + 1]))
            np.testing.assert_allclose(state.numpy()[0], out.states[t + 1], atol=1e-4)
            embeds = torch.cat([embeds, model.embed_states(torch.as_tensor(out.states[t + 1 : t + 2]))], dim=1)


def test_carried_state_blocks_are_copied_from_the_previous_state(tiny_model):
    """An env's carried_state (Meta-World's stacked frame) overrides the LLM's guess."""
    starts = _starts(2, seed=5)
    config = GenerationConfig(max_steps=5, stop_on_done=False)
    free = generate_rollouts(tiny_model, ["Push the red ball left"] * 2, starts, config)
    carried = generate_rollouts(tiny_model, ["Push the red ball left"] * 2, starts, config,
                                carried_state=((6, 0, 4),))
    for rollout in carried:
        np.testing.assert_array_equal(rollout.states[1:, 6:10], rollout.states[:-1, 0:4])
    assert any(not np.array_equal(r.states[1:, 6:10], r.states[:-1, 0:4]) for r in free)


def test_a_block_carried_while_empty_stays_empty_and_a_filled_one_moves():
    """Meta-World's second object slot: empty in most scenes (kept empty, whatever the
    model predicts there), a nail or a button in others (the prediction stands)."""
    previous = np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.2]], dtype=np.float32)
    predicted = np.array([[2.0, 0.3, -0.1], [2.0, 0.6, 0.3]], dtype=np.float32)
    for make in (np.asarray, torch.as_tensor):
        out = np.asarray(carry_state(make(predicted), make(previous), ((1, 1, 2, True),)))
        np.testing.assert_array_equal(out, np.array([[2.0, 0.0, 0.0], [2.0, 0.6, 0.3]], dtype=np.float32))
        out = np.asarray(carry_state(make(predicted), make(previous), ((1, 1, 2),)))
        np.testing.assert_array_equal(out, np.array([[2.0, 0.0, 0.0], [2.0, 0.5, 0.2]], dtype=np.float32))
    np.testing.assert_array_equal(predicted[0], np.array([2.0, 0.3, -0.1], dtype=np.float32))  # unchanged


def test_sampling_is_seeded_and_differs_from_greedy(tiny_model):
    instructions, starts = ["Nudge the blue ball forward"] * 4, _starts(4)
    config = GenerationConfig(max_steps=6, stop_on_done=False, temperature=2.0)
    a = generate_rollouts(tiny_model, instructions, starts, config, seed=1)
    b = generate_rollouts(tiny_model, instructions, starts, config, seed=1)
    assert all(np.array_equal(x.actions, y.actions) for x, y in zip(a, b))
    greedy = generate_rollouts(tiny_model, instructions, starts, GenerationConfig(max_steps=6, stop_on_done=False))
    assert any(not np.array_equal(x.actions, y.actions) for x, y in zip(a, greedy))


def test_sampled_actions_follow_the_action_heads_distribution(tiny_model):
    """At temperature 1 the imagined actions are draws from the model's own action
    distribution (greedy decoding of a weakly grounded model collapsed onto a few push
    directions); lower temperatures sharpen it towards the greedy action."""
    from kalm.imagine.generate import _choose_actions

    torch.manual_seed(0)
    hidden = 20 * torch.randn(1, tiny_model.llm.config.hidden_size).expand(20000, -1)
    probs = torch.softmax(tiny_model.predict_action(hidden[:1]), -1)[0]
    assert probs.max() > 4 * probs.median()  # peaked enough that a flattened draw would show
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(_choose_actions(tiny_model, hidden, 1.0, generator), minlength=probs.numel())
    assert (counts / counts.sum() - probs).abs().sum() < 0.05  # total variation < 0.025
    greedy = int(probs.argmax())
    cold = torch.bincount(_choose_actions(tiny_model, hidden, 0.3, generator), minlength=probs.numel())
    assert cold[greedy] / cold.sum() > counts[greedy] / counts.sum()
    assert (_choose_actions(tiny_model, hidden[:8], 0.0, generator) == greedy).all()


def test_stop_function_ends_a_rollout_at_that_state(tiny_model):
    starts = _starts(2)
    out = generate_rollouts(tiny_model, ["a", "b"], starts, GenerationConfig(max_steps=10, stop_on_done=False),
                            stop=lambda i, s: i == 0)
    assert out[0].stopped_by == "stop" and len(out[0].actions) == 1 and len(out[0].states) == 2
    assert out[1].stopped_by == "horizon" and len(out[1].actions) == 10


def test_labelling_cuts_at_the_first_success_and_rewards_it():
    spec = get_spec("clevr")
    task = Relation("red", "blue", "left")
    far = np.array([0.3, 0.2, 0.0, 0.2, 0.0, 0.5, -0.4, -0.1, 0.4, -0.1], dtype=np.float32)
    near = far.copy()
    near[0:2] = (-0.3, 0.2)  # red now 0.3 left of blue
    states = np.stack([far, far, near, near])
    episode, ok = label_rollout(spec, task, "Put the red ball left of the blue ball", states, np.array([1, 2, 3]),
                                "sparse")
    assert ok and episode.terminated and not episode.truncated
    assert episode.length == 2 and episode.rewards.tolist() == [0.0, 1.0]
    failed, ok = label_rollout(spec, task, "x", np.stack([far, far]), np.array([4]), "sparse")
    assert not ok and failed.truncated and failed.rewards.tolist() == [0.0]


def test_hallucination_stats_count_implausible_transitions():
    spec = get_spec("clevr")
    s = np.array([0.0, 0.2, -0.45, 0.55, 0.45, 0.55, -0.45, -0.15, 0.45, -0.15], dtype=np.float32)
    jump = s.copy()
    jump[0] += 0.9
    stats = HallucinationStats()
    stats.add(check_rollout(spec, np.stack([s, s, jump]), np.array([0, 0])))
    summary = stats.summary()
    assert summary["transitions"] == 2 and summary["transition_share"]["too_far"] == 0.5
    assert summary["rollout_share"]["off_workbench"] == 1.0


def test_prompts_cycle_the_level_tasks_with_admissible_starts():
    spec = get_spec("clevr")
    instructions, starts = sample_prompts(spec, "easy", 40, seed=0)
    assert len({str(i.task.to_json()) for i in instructions}) == 20
    assert starts.shape == (40, 10)
    with pytest.raises(ValueError, match="unknown level"):
        sample_prompts(spec, "medium", 4, 0)


def test_prompts_offer_every_phrasing_of_a_level_before_repeating_one():
    spec = get_spec("clevr")
    level = spec.levels["rephrase"](0)
    instructions, _ = sample_prompts(spec, "rephrase", len(level), seed=1)
    assert sorted((i.text, str(i.task.to_json())) for i in instructions) == sorted(
        (i.text, str(i.task.to_json())) for i in level)
    twice, _ = sample_prompts(spec, "easy", 2 * len(spec.levels["easy"](0)), seed=2)
    assert set(collections.Counter((i.text, str(i.task.to_json())) for i in twice).values()) == {2}


def test_several_starts_per_instruction_repeat_it_consecutively_from_different_states():
    spec = get_spec("clevr")
    instructions, starts = sample_prompts(spec, "rephrase", 10, seed=3, starts_per_instruction=4)
    assert len(instructions) == 10 and starts.shape == (10, 10)
    texts = [i.text for i in instructions]
    assert texts[0:4] == [texts[0]] * 4 and texts[4:8] == [texts[4]] * 4 and texts[8:10] == [texts[8]] * 2
    assert len({texts[0], texts[4], texts[8]}) == 3
    assert len({s.tobytes() for s in starts}) == 10
    assert sample_prompts(spec, "rephrase", 5, seed=3)[0] == sample_prompts(spec, "rephrase", 5, 3, 1)[0]
    with pytest.raises(ValueError, match="starts_per_instruction"):
        ImagineConfig(starts_per_instruction=0)


def test_imagine_writes_labelled_episodes_with_provenance(tiny_model):
    spec = get_spec("clevr")
    config = ImagineConfig(precision="fp32", level="easy", n=6, seed=0, keep_failures=True, physics_filter=False,
                           generation=GenerationConfig(max_steps=5))
    result = imagine(tiny_model, spec, config, progress=False)
    assert result.stats["counts"]["generated"] == 6
    assert result.dataset.metadata["source"] == "imagined"
    for episode in result.dataset.episodes:
        assert episode.task["kind"] == "push" and 1 <= episode.length <= 5
    strict = ImagineConfig(precision="fp32", level="easy", n=6, generation=GenerationConfig(max_steps=5))
    result = imagine(tiny_model, spec, strict, progress=False)
    counts = result.stats["counts"]
    assert counts["kept"] == counts["succeeded"] - counts["dropped_fragile"]
    if result.dataset is None:  # an untrained model rarely reaches a goal
        assert counts["kept"] == 0
    else:
        assert all(e.terminated for e in result.dataset.episodes)


def test_llm_policy_fed_imagined_states_repeats_the_generated_actions(tiny_model):
    """The policy and the generator share one layout: fed the generator's own states,
    the policy must choose the generator's actions at every step."""
    from kalm.envs.spec import Instruction
    from kalm.imagine.llm_policy import LLMPolicy

    spec = get_spec("clevr")
    env = spec.make_env()
    start, _ = env.reset(seed=4)
    instruction = Instruction("Push the red ball to the left of the blue ball", Relation("red", "blue", "left"))
    generated = generate_rollouts(tiny_model, [instruction.text], start[None],
                                  GenerationConfig(max_steps=6, stop_on_done=False))[0]
    act = LLMPolicy(tiny_model).begin(env, instruction, start, np.random.default_rng(0))
    chosen = [act(generated.states[t]) for t in range(6)]
    assert chosen == generated.actions.tolist()


def test_llm_policy_in_a_batch_acts_as_it_does_alone(tiny_model):
    """Lockstep evaluation feeds rows of different prompt lengths (left-padded) and
    different states through one cache; each row must choose what it chooses alone."""
    from kalm.envs.spec import Instruction
    from kalm.imagine.llm_policy import LLMPolicy

    spec = get_spec("clevr")
    env = spec.make_env()
    instructions = [Instruction("Push the red ball to the left of the blue ball", Relation("red", "blue", "left")),
                    Instruction("Can you move the green ball behind the cyan ball?", Relation("green", "cyan", "behind")),
                    Instruction("Push the red ball to the left of the blue ball", Relation("red", "blue", "left"))]
    starts = np.stack([env.reset(seed=s)[0] for s in (1, 2, 3)]).astype(np.float32)
    observed = np.stack([np.stack([env.reset(seed=10 * s + t)[0] for t in range(5)]) for s in range(3)])
    policy = LLMPolicy(tiny_model)
    alone = []
    for ins, start, obs in zip(instructions, starts, observed):
        act = policy.begin(env, ins, start, np.random.default_rng(0))
        alone.append([act(start)] + [act(o) for o in obs])
    act_batch = policy.begin_batch(instructions, starts)
    together = [act_batch(starts)] + [act_batch(observed[:, t]) for t in range(5)]
    env.close()
    assert np.array(together).T.tolist() == alone
    assert len({tuple(row) for row in alone}) > 1, "rows that all act alike would not show a mix-up"


def test_sampling_llm_policy_draws_per_episode_and_acts_alike_in_a_batch(tiny_model):
    from kalm.evaluation.evaluate import evaluate
    from kalm.imagine.llm_policy import LLMPolicy

    class OneAtATime:  # the same policy without begin_batch: evaluation runs its episodes alone
        def __init__(self, policy):
            self.name, self.begin = policy.name, policy.begin

    spec = get_spec("clevr")
    levels = {"seen": spec.levels["seen"](0)}

    def steps(policy, seed=2):
        return [(r["success"], r["steps"]) for r in evaluate(policy, spec, levels, 8, seed, progress=False)["results"]]

    sampled = LLMPolicy(tiny_model, batch_size=3, temperature=3.0)
    assert sampled.name == "llm-policy@T3"
    assert steps(sampled) == steps(OneAtATime(sampled)) == steps(LLMPolicy(tiny_model, temperature=3.0))
    greedy = steps(LLMPolicy(tiny_model, batch_size=3))
    assert steps(sampled) != greedy and steps(sampled, seed=3) != steps(sampled)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        LLMPolicy(tiny_model, temperature=-1.0)


def test_imagine_command_writes_a_dataset_and_its_statistics(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from kalm.cli import app
    from kalm.data.episodes import load_episodes

    tiny_model.save(tmp_path / "model")
    out = tmp_path / "easy.h5"
    args = ["imagine", "--model", str(tmp_path / "model"), "--level", "easy", "--n", "6", "--out", str(out),
            "--max-steps", "3", "--temperature", "1.0", "--keep-failures", "--no-physics-filter"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    episodes = load_episodes(out, get_spec("clevr")).episodes
    assert len(episodes) == 6 and all(1 <= len(e.actions) <= 3 for e in episodes)
    stats = json.loads((tmp_path / "easy.h5.stats.json").read_text())
    assert stats["level"] == "easy" and stats["counts"]["generated"] == 6

    refused = CliRunner().invoke(app, ["imagine", "--model", str(tmp_path / "model"), "--level", "medium", "--n", "2",
                                       "--out", str(tmp_path / "x.h5")])
    assert refused.exit_code == 2 and "unknown level 'medium'" in refused.output
    assert not (tmp_path / "x.h5").exists()


def test_imagine_command_defaults_are_the_config_defaults(tiny_model, tmp_path, monkeypatch):
    """Without flags the command keeps what the pipeline keeps: plausible rollouts that
    reach their goal; each flag overrides one field."""
    from typer.testing import CliRunner

    import kalm.imagine.rollouts as rollouts
    from kalm.cli import app

    tiny_model.save(tmp_path / "model")
    seen = []

    def capture(model, spec, config, progress=True):
        seen.append(config)
        raise ValueError("captured")

    monkeypatch.setattr(rollouts, "imagine", capture)
    base = ["imagine", "--model", str(tmp_path / "model"), "--level", "easy", "--out", str(tmp_path / "x.h5")]
    for extra in ([], ["--keep-failures", "--no-physics-filter", "--robust-noise", "0", "--robust-share", "0.9",
                       "--compose", "--segment-steps", "2", "--starts-per-instruction", "4",
                       "--precision", "fp32"]):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and "captured" in result.output
    fields = ("keep_failures", "physics_filter", "robust_noise", "robust_share", "compose", "segment_steps",
              "starts_per_instruction", "precision")
    assert [getattr(seen[0], f) for f in fields] == [getattr(ImagineConfig(), f) for f in fields]
    assert [getattr(seen[1], f) for f in fields] == [True, False, 0.0, 0.9, True, 2, 4, "fp32"]


def _two_balls(red, blue):
    """A CLEVR state with red and blue where given and the other balls far away."""
    state = np.array([0.0, 0.0, 0.0, 0.0, 0.4, 0.5, -0.4, 0.5, 0.0, 0.55], np.float32)
    state[0:2], state[2:4] = red, blue
    return state


def test_robust_share_is_high_deep_in_the_goal_and_low_on_its_border():
    from kalm.imagine.filters import robust_success_share

    task, rng, scale = Relation("red", "blue", "left"), np.random.default_rng(0), np.full(10, 0.05)
    blue = np.array([0.1, 0.2])
    start = _two_balls([0.4, 0.2], blue)
    angle = np.radians(180 - 44.5)  # 0.5 degrees inside the 45-degree sector, near the 0.39 distance limit
    border = _two_balls(blue + 0.37 * np.array([np.cos(angle), np.sin(angle)]), blue)
    deep = _two_balls(blue + np.array([-0.3, 0.0]), blue)
    assert task.success(border, start) and task.success(deep, start)
    assert robust_success_share(task, np.stack([start, deep]), scale, 0.7, rng) > 0.9
    assert robust_success_share(task, np.stack([start, border]), scale, 0.7, rng) < 0.4
    assert robust_success_share(task, np.stack([start, border]), scale, 1e-6, rng) == 1.0
    with pytest.raises(ValueError, match="robust_share"):
        ImagineConfig(robust_share=0.0)


def test_imagine_drops_fragile_successes_and_counts_them(tiny_model, monkeypatch):
    """Two imagined successes of one instruction: the one resting on the goal border is
    dropped (its success could be the model's error), the one deep inside is kept."""
    from kalm.envs.spec import Instruction
    from kalm.imagine import generate, rollouts
    from kalm.imagine.generate import GeneratedRollout

    spec, task = get_spec("clevr"), Relation("red", "blue", "left")
    blue = np.array([0.1, 0.2])
    start = _two_balls([0.4, 0.2], blue)
    angle = np.radians(180 - 44.5)
    finals = [_two_balls(blue + 0.37 * np.array([np.cos(angle), np.sin(angle)]), blue),
              _two_balls(blue + np.array([-0.3, 0.0]), blue)]
    text = "Put the red ball left of the blue ball"
    monkeypatch.setattr(rollouts, "sample_prompts", lambda *a: ([Instruction(text, task)] * 2, np.stack([start] * 2)))
    monkeypatch.setattr(generate, "generate_rollouts", lambda *a, **k: [
        GeneratedRollout(text, np.stack([start, f]), np.array([3]), "stop") for f in finals])
    config = ImagineConfig(precision="fp32", level="rephrase", n=2, physics_filter=False)  # default robustness filter
    result = rollouts.imagine(tiny_model, spec, config, progress=False)
    counts = result.stats["counts"]
    assert (counts["succeeded"], counts["dropped_fragile"], counts["kept"]) == (2, 1, 1)
    np.testing.assert_array_equal(result.dataset.episodes[0].observations[-1], finals[1])
    result = rollouts.imagine(tiny_model, spec, ImagineConfig(precision="fp32", level="rephrase", n=2, physics_filter=False,
                                                              robust_noise=0.0), progress=False)
    assert result.stats["counts"]["kept"] == 2
    assert len(result.attempts) == 2 and all(len(actions) for _, _, actions in result.attempts)


def test_replaying_imagined_rollouts_counts_real_successes():
    from dataclasses import replace as dc_replace

    from kalm.data.episodes import EpisodeDataset
    from kalm.evaluation.imagined import replay_generated, replay_imagined

    spec = get_spec("clevr")
    env = spec.make_env()
    task = Relation("red", "blue", "left")
    obs, _ = env.reset(seed=3, options={"task": task})
    expert = spec.make_expert(env)
    states, actions = [obs], []
    for _ in range(spec.horizon(task)):
        action = expert(obs, task, env.unwrapped.start_state)
        obs, _, terminated, truncated, info = env.step(action)
        states.append(obs)
        actions.append(action)
        if terminated or truncated:
            break
    assert info["success"]
    real, _ = label_rollout(spec, task, "put red left of blue", np.array(states), np.array(actions), "sparse")
    # the same imagined states, but actions that push another ball: not real on replay
    wrong = dc_replace(real, actions=np.full_like(real.actions, 4 * 8 + 2))
    stats = replay_imagined(spec, EpisodeDataset(env="clevr", episodes=(real, wrong), metadata={}))
    assert stats == {"replayed": 2, "real_success": 1, "not_replayable": 0, "real_success_share": 0.5}
    assert replay_imagined(spec, None)["real_success_share"] is None
    # generated rollouts are replayed whether kept or not, evenly spaced up to a limit
    attempts = [(task, real.observations[0], real.actions), (task, wrong.observations[0], wrong.actions)] * 3
    assert replay_generated(spec, attempts, limit=6)["real_success_share"] == 0.5
    assert replay_generated(spec, attempts, limit=3) == {"replayed": 3, "real_success": 3, "not_replayable": 0,
                                                         "real_success_share": 1.0}  # every other one: all real


def _place(state, relation, distance=0.25, angle=0.0):
    """``state`` with the relation's object ``distance`` from its anchor, ``angle``
    degrees off the relation's direction."""
    from kalm.envs.clevr.tasks import COLOURS, DIRECTIONS

    moved = np.array(state, dtype=np.float32)
    anchor = moved[2 * COLOURS.index(relation.anchor): 2 * COLOURS.index(relation.anchor) + 2]
    obj = 2 * COLOURS.index(relation.object)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    rotated = np.array([[c, -s], [s, c]]) @ np.array(DIRECTIONS[relation.direction])
    moved[obj: obj + 2] = anchor + distance * rotated.astype(np.float32)
    return moved


def _scripted_segments(spec, calls, refuse=None, border=None):
    """A stand-in for the LLM: each segment reads its prompt back as a relation and
    pushes the object there in one step, except for ``refuse``'s object, which stays,
    and ``border``'s, which lands just inside the edge of the goal's sector."""
    from kalm.imagine.generate import GeneratedRollout

    def generate(model, texts, starts, config, stop=None, seed=0, progress=None, carried_state=(), prompt_ids=None):
        out = []
        for k, (text, start) in enumerate(zip(texts, starts)):
            part = spec.parse_instruction(text)
            calls.append((part, np.array(start)))
            after = np.array(start) if part.object == refuse else (
                _place(start, part, 0.37, 44.5) if part.object == border else _place(start, part))
            assert stop(k, after) or refuse is not None
            out.append(GeneratedRollout(text, np.stack([start, after]), np.array([7]), "stop"))
        return out

    return generate


def test_composed_rollouts_chain_one_segment_per_part(tiny_model, monkeypatch):
    """Each part is prompted with a training phrasing of that part alone, from the state
    where the previous part's segment ended; the chain is labelled with the composite."""
    from kalm.envs.clevr.tasks import AllOf
    from kalm.envs.spec import Instruction
    from kalm.imagine import generate, rollouts

    spec = get_spec("clevr")
    parts = (Relation("red", "blue", "left"), Relation("green", "cyan", "behind"))
    task, text = AllOf(parts), "Put red left of blue, then green behind cyan"
    start = np.array([0.3, 0.1, -0.2, 0.1, 0.0, 0.0, -0.4, 0.4, 0.3, 0.4], np.float32)
    assert not any(p.success(start, start) for p in parts)
    calls = []
    monkeypatch.setattr(generate, "generate_rollouts", _scripted_segments(spec, calls))
    monkeypatch.setattr(rollouts, "sample_prompts", lambda *a: ([Instruction(text, task)], start[None]))
    config = ImagineConfig(precision="fp32", level="hard", n=1, compose=True, physics_filter=False, robust_noise=0.0)
    result = rollouts.imagine(tiny_model, spec, config, progress=False)

    assert [c[0] for c in calls] == list(parts)
    np.testing.assert_array_equal(calls[1][1], _place(start, parts[0]))
    (episode,) = result.dataset.episodes
    assert episode.instruction == text and episode.task == task.to_json()
    assert episode.length == 2 and episode.terminated and episode.rewards[-1] == 1.0
    np.testing.assert_array_equal(episode.observations[-1], _place(_place(start, parts[0]), parts[1]))


def test_a_chain_stops_at_its_first_failed_part_and_held_parts_take_no_step(tiny_model, monkeypatch):
    from kalm.envs.clevr.tasks import AllOf
    from kalm.envs.spec import Instruction
    from kalm.imagine import compose, generate

    spec = get_spec("clevr")
    start = np.array([0.3, 0.1, 0.0, 0.1, 0.0, -0.2, -0.4, 0.4, 0.3, 0.4], np.float32)
    held = Relation("blue", "red", "left")  # blue is already left of red
    assert held.success(start, start)
    failing = AllOf((Relation("green", "cyan", "behind"), Relation("red", "blue", "left")))
    reached = AllOf((held, Relation("cyan", "purple", "front")))
    broken = AllOf((held, Relation("red", "purple", "front")))  # moving red undoes the held part
    calls = []
    monkeypatch.setattr(generate, "generate_rollouts", _scripted_segments(spec, calls, refuse="green"))
    prompts = [Instruction("a", failing), Instruction("b", reached), Instruction("c", broken)]
    source = generate.LLMRollouts(tiny_model)
    chains = compose.imagine_composed(source, spec, prompts, np.stack([start] * 3), GenerationConfig(),
                                      segment_steps=3, seed=0)
    # no second part after a failure; the held first parts take no step
    assert [c[0] for c in calls] == [failing.tasks[0], reached.tasks[1], broken.tasks[1]]
    first, second, third = chains
    assert len(first.actions) == 1 and not failing.success(first.states[-1], start)
    assert len(second.actions) == 1 and reached.success(second.states[-1], start)
    assert len(third.actions) == 1 and not broken.success(third.states[-1], start)
    with pytest.raises(ValueError, match="not a conjunction"):
        compose.imagine_composed(source, spec, [Instruction("c", held)], start[None], GenerationConfig(), 3, 0)


def test_segments_sharing_a_phrasing_are_generated_together_and_each_chain_keeps_its_own(tiny_model, monkeypatch):
    """Rows are sent to the model grouped by phrasing (so they share a prefill) and come
    back to the chain they belong to."""
    from kalm.envs.clevr.tasks import AllOf
    from kalm.envs.spec import Instruction
    from kalm.imagine import compose, generate

    spec = get_spec("clevr")
    start = np.array([0.3, 0.1, -0.2, 0.1, 0.0, 0.0, -0.4, 0.4, 0.3, 0.4], np.float32)
    tasks = [AllOf((Relation("red", "blue", "left"), Relation("green", "cyan", "behind"))),
             AllOf((Relation("cyan", "purple", "front"), Relation("blue", "red", "right")))]
    prompts = [Instruction(str(i), tasks[i % 2]) for i in range(40)]
    scripted, batches = _scripted_segments(spec, []), []

    def recorded(model, texts, *args, **kwargs):
        batches.append(list(texts))
        return scripted(model, texts, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_rollouts", recorded)
    chains = compose.imagine_composed(generate.LLMRollouts(tiny_model), spec, prompts, np.stack([start] * 40),
                                      GenerationConfig(), segment_steps=3, seed=0)
    assert len(batches) == 2 and all(texts == sorted(texts) for texts in batches)
    assert len(set(batches[0])) < 40  # some phrasings drawn twice: those rows share a prefill
    for prompt, chain in zip(prompts, chains):
        assert prompt.task.success(chain.states[-1], start) and len(chain.actions) == 2


@pytest.mark.parametrize("border", [None, "red"])
def test_each_part_must_hold_robustly_before_the_next_is_asked_for(tiny_model, monkeypatch, border):
    """With the robustness check on, a part reached just inside its goal border ends
    the chain (its success could be the model's error); reached deep inside, it goes on."""
    from kalm.envs.clevr.tasks import AllOf
    from kalm.envs.spec import Instruction
    from kalm.imagine import compose, generate

    spec = get_spec("clevr")
    task = AllOf((Relation("red", "blue", "left"), Relation("green", "cyan", "behind")))
    start = np.array([0.3, 0.1, -0.2, 0.1, 0.0, 0.0, -0.4, 0.4, 0.3, 0.4], np.float32)
    calls = []
    monkeypatch.setattr(generate, "generate_rollouts", _scripted_segments(spec, calls, border=border))
    source = generate.LLMRollouts(tiny_model)
    (chain,) = compose.imagine_composed(source, spec, [Instruction("a", task)], start[None], GenerationConfig(),
                                        segment_steps=3, seed=0, robust_noise=0.7)
    assert len(calls) == (1 if border else 2)
    assert task.success(chain.states[-1], start) == (border is None)


def test_composed_imagination_with_a_real_model_bounds_each_part(tiny_model):
    """With the (untrained) tiny LLM: conjunctions take at most ``segment_steps`` per
    part; the level's other tasks (line, circle) are imagined whole."""
    from kalm.envs.spec import subgoals

    spec = get_spec("clevr")
    config = ImagineConfig(precision="fp32", level="hard", n=8, compose=True, segment_steps=2, keep_failures=True,
                           physics_filter=False, robust_noise=0.0, generation=GenerationConfig(max_steps=3))
    result = imagine(tiny_model, spec, config, progress=False)
    assert result.stats["counts"]["generated"] == 8
    parsed = [(spec.parse_task(e.task), e.length) for e in result.dataset.episodes]
    assert any(subgoals(t) for t, _ in parsed)
    for task, length in parsed:
        assert length <= (2 * len(subgoals(task)) if subgoals(task) else 3)
    with pytest.raises(ValueError, match="segment_steps"):
        ImagineConfig(segment_steps=0)
