"""Grounding on a tiny random Llama with the real SmolLM2 tokenizer (CPU, fast)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kalm.grounding.backbone import BackboneError, load_backbone
from kalm.grounding.checkpoint import GroundingCheckpointError, latest_checkpoint
from kalm.grounding.finetune import GroundingConfig, train_grounding
from kalm.grounding.model import GroundedLM, GroundedLMConfig, LoraSettings, NormStats
from kalm.grounding.objective import GroundingObjective
from kalm.grounding.prompts import TASKS, collate

STATE_DIM, N_ACTIONS = 10, 40


def _model(backbone, finetune="lora", seed=0, **kw) -> GroundedLM:
    torch.manual_seed(seed)
    config = GroundedLMConfig(env="clevr", state_dim=STATE_DIM, action_dim=N_ACTIONS, discrete=True,
                              backbone=str(backbone), finetune=finetune, **kw)
    stats = NormStats.identity(STATE_DIM, N_ACTIONS, True)
    return GroundedLM.create(config, replace(stats, state_std=np.full(STATE_DIM, 0.3, np.float32),
                                             delta_std=np.full(STATE_DIM, 0.1, np.float32)))


def _trajectory(rng, steps=3):
    obs = rng.uniform(-0.4, 0.5, size=(steps + 1, STATE_DIM)).astype(np.float32)
    return obs, rng.integers(0, N_ACTIONS, size=steps)


def test_placeholders_are_added_tokens_and_found(tiny_backbone):
    model = _model(tiny_backbone)
    vocab = model.tokenizer.get_vocab()
    assert vocab["<|state|>"] == model.state_token_id and vocab["<|action|>"] == model.action_token_id
    assert model.state_token_id >= model.config.base_vocab_size  # added, not reused
    assert model.llm.get_input_embeddings().weight.shape[0] == len(model.tokenizer)
    obs, acts = _trajectory(np.random.default_rng(0))
    ex = model.prompts.explanation(obs, acts, "Push the red ball behind the blue ball")
    ids = ex.input_ids
    states, actions = np.flatnonzero(ids == model.state_token_id), np.flatnonzero(ids == model.action_token_id)
    assert len(states) == 4 and len(actions) == 3
    assert np.all(states[1:] == actions + 1) and np.all(actions == states[:-1] + 1)  # s0 a0 s1 a1 s2 a2 s3
    np.testing.assert_array_equal(ex.states[states], obs)
    np.testing.assert_array_equal(ex.actions[actions], acts)
    # text loss covers exactly the instruction tokens and EOS
    targets = ex.token_targets[ex.token_targets >= 0]
    text = model.tokenizer.decode(targets[:-1])
    assert text.strip() == "Push the red ball behind the blue ball"
    assert targets[-1] == model.tokenizer.eos_token_id


def test_embeddings_injected_exactly_at_placeholders(tiny_backbone):
    model = _model(tiny_backbone)
    rng = np.random.default_rng(1)
    obs, acts = _trajectory(rng)
    batch = collate([model.prompts.generation(obs, acts, "Move the red ball left of the cyan ball", True)],
                    model.pad_token_id)
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.embed_sequence(ids, batch["states"], batch["actions"])
        plain = model.llm.get_input_embeddings()(ids)
        changed = (embeds - plain).abs().sum(-1)[0] > 0
        placeholder = (ids == model.state_token_id) | (ids == model.action_token_id)
        assert torch.equal(changed, placeholder[0])
        state_pos = torch.nonzero(ids[0] == model.state_token_id).flatten()
        expected = model.io.state_encoder(model.normalize_states(torch.from_numpy(obs)))
        torch.testing.assert_close(embeds[0, state_pos], expected)
        action_pos = torch.nonzero(ids[0] == model.action_token_id).flatten()
        torch.testing.assert_close(embeds[0, action_pos], model.io.action_encoder(torch.from_numpy(acts)))
    # the generation targets follow the layout: a_t at s_t, s_{t+1} at a_t, done at the last state
    ex = model.prompts.generation(obs, acts, "x", True)
    s_pos, a_pos = np.flatnonzero(ex.input_ids == model.state_token_id), np.flatnonzero(
        ex.input_ids == model.action_token_id)
    np.testing.assert_array_equal(np.flatnonzero(ex.action_mask), s_pos[:-1])
    np.testing.assert_array_equal(ex.action_targets[s_pos[:-1]], acts)
    np.testing.assert_array_equal(np.flatnonzero(ex.state_mask), a_pos)
    np.testing.assert_array_equal(ex.state_targets[a_pos], obs[1:])
    assert ex.done_targets[s_pos[-1]] == 1 and ex.done_targets[s_pos[:-1]].sum() == 0


def _fixed_batch(model, task, rng):
    examples = []
    for i in range(4):
        obs, acts = _trajectory(rng)
        text = ["Push the red ball behind the blue ball", "Put the green ball left of the cyan ball"][i % 2]
        if task == "dynamics":
            examples.append(model.prompts.dynamics(obs[0], acts[0], obs[1]))
        elif task == "explanation":
            examples.append(model.prompts.explanation(obs, acts, text))
        elif task == "generation":
            examples.append(model.prompts.generation(obs, acts, text, True))
        else:
            examples.append(model.prompts.goal(obs[0], text, obs[-1]))
    return collate(examples, model.pad_token_id)


@pytest.mark.parametrize("task", TASKS)
def test_each_task_loss_falls(tiny_backbone, task):
    # full fine-tuning: a random tiny model's frozen LM head would make text learn slowly
    model = _model(tiny_backbone, finetune="full")
    objective = GroundingObjective(model)
    batch = _fixed_batch(model, task, np.random.default_rng(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = objective(batch)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_save_load_round_trip(tiny_backbone, tmp_path, finetune):
    model = _model(tiny_backbone, finetune=finetune)
    with torch.no_grad():  # move every trained part off its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    batch = _fixed_batch(model, "generation", np.random.default_rng(3))

    def outputs(m):
        with torch.no_grad():
            h, _ = m(m.embed_sequence(batch["input_ids"], batch["states"], batch["actions"]), batch["attention_mask"],
                     batch["position_ids"])
            return m.predict_action(h), m.predict_state(h, batch["state_reference"]), m.predict_done(h), \
                m.token_logits(h)

    model.save(tmp_path / "ckpt")
    loaded = GroundedLM.load(tmp_path / "ckpt")
    for a, b in zip(outputs(model), outputs(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_backbone_cut_to_its_first_layers_keeps_them_and_is_rebuilt_at_that_depth(tiny_backbone, tmp_path,
                                                                                      finetune):
    whole, cut = _model(tiny_backbone, finetune=finetune), _model(tiny_backbone, finetune=finetune, layers=1)
    assert (len(whole.decoder.layers), len(cut.decoder.layers)) == (2, 1)
    batch = _fixed_batch(cut, "generation", np.random.default_rng(3))
    embeds = cut.embed_sequence(batch["input_ids"], batch["states"], batch["actions"])
    with torch.no_grad():  # the kept block is the backbone's first, read through its own final norm
        first = whole.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(cut(embeds, batch["attention_mask"], batch["position_ids"])[0],
                                   whole.decoder.norm(first), rtol=0, atol=1e-5)
        for p in cut.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    cut.eval()
    cut.save(tmp_path / "ckpt")
    loaded = GroundedLM.load(tmp_path / "ckpt")
    assert loaded.config.layers == 1 and len(loaded.decoder.layers) == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(embeds, batch["attention_mask"], batch["position_ids"])[0],
                                   cut(embeds, batch["attention_mask"], batch["position_ids"])[0], rtol=0, atol=1e-5)
    with pytest.raises(BackboneError, match="first 3 layers: the backbone has 2"):
        _model(tiny_backbone, layers=3)
    with pytest.raises(ValueError, match=r"depth .* must be in \(0, 1\]"):
        GroundingConfig(depth=0.0)


def test_load_refuses_other_env_and_bad_dirs(tiny_backbone, tmp_path):
    from kalm.envs import get_spec

    model = _model(tiny_backbone)
    model.save(tmp_path / "ckpt")
    spec = get_spec("clevr")
    GroundedLM.load(tmp_path / "ckpt", spec=spec)  # same shapes: accepted
    other = replace(spec, name="other", state_dim=39)
    with pytest.raises(GroundingCheckpointError, match=r"state_dim 10.*state_dim 39"):
        GroundedLM.load(tmp_path / "ckpt", spec=other)
    with pytest.raises(GroundingCheckpointError, match=str(tmp_path / "nothing")):
        GroundedLM.load(tmp_path / "nothing")


def test_backbone_refuses_missing_and_non_causal_paths(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackboneError, match=str(missing)):
        load_backbone(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneError, match=str(empty)):
        load_backbone(empty)
    encoder = tmp_path / "bert"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(BackboneError, match=f"{encoder}.*not a causal language model"):
        load_backbone(encoder)


def _dataset(n=24, seed=0):
    """Synthetic episodes in the data module's format: pushes that satisfy the task."""
    from kalm.data.episodes import Episode, EpisodeDataset
    from kalm.envs.clevr.tasks import relation_goals

    rng = np.random.default_rng(seed)
    goals = relation_goals()
    episodes = []
    for i in range(n):
        task = goals[i % len(goals)]
        steps = 1 + i % 3
        obs = np.tile(rng.uniform(-0.4, 0.4, size=(1, STATE_DIM)), (steps + 1, 1)).astype(np.float32)
        for t in range(1, steps + 1):
            obs[t] = obs[t - 1] + rng.normal(0, 0.05, STATE_DIM)
        # put the object next to the anchor, in the right direction, at the end
        from kalm.envs.clevr.tasks import COLOURS, DIRECTIONS

        a, o = COLOURS.index(task.anchor), COLOURS.index(task.object)
        obs[-1, 2 * o : 2 * o + 2] = obs[-1, 2 * a : 2 * a + 2] + 0.3 * np.asarray(DIRECTIONS[task.direction])
        episodes.append(Episode(observations=obs, actions=rng.integers(0, N_ACTIONS, steps).astype(np.int64),
                                rewards=np.zeros(steps, np.float32), terminated=True, truncated=False,
                                instruction="Push the red ball behind the blue ball", task=task.to_json()))
    return EpisodeDataset(env="clevr", episodes=tuple(episodes), metadata={})


def test_training_resumes_to_the_same_final_step(tiny_backbone, tmp_path):
    """On half the tiny backbone's two layers: the checkpoints carry the depth."""
    from kalm.envs import get_spec

    spec = get_spec("clevr")
    data = _dataset()
    config = GroundingConfig(steps=6, checkpoint_every=2, batch_tokens=160, max_batch_size=4, eval_episodes=4,
                             explanation_max_tokens=4, generation_max_steps=3, num_threads=1, precision="fp32",
                             depth=0.5)
    out = tmp_path / "run"
    # a run "killed" after step 4: train 4 steps with the same schedule, keeping its checkpoints
    first = train_grounding(spec, data, str(tiny_backbone), out, replace(config, checkpoint_every=2), progress=False,
                            resume=False, stop_after=4)
    assert first["stopped_at"] == 4
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step-0000004"
    metrics = train_grounding(spec, data, str(tiny_backbone), out, config, resume=True, progress=False)
    assert metrics["steps"] == 6 and metrics["resumed_from"] == 4
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("dynamics_mse", "copy_baseline_mse", "explanation_accuracy", "generation_success"):
        assert np.isfinite(saved[key])
    assert len(GroundedLM.load(out / "model", spec=spec).decoder.layers) == 1


def test_resumed_run_matches_an_uninterrupted_one(tiny_backbone, tmp_path):
    from safetensors.torch import load_file

    from kalm.envs import get_spec

    spec = get_spec("clevr")
    data = _dataset()
    config = GroundingConfig(steps=5, checkpoint_every=0, batch_tokens=160, max_batch_size=4, eval_episodes=2,
                             explanation_max_tokens=2, generation_max_steps=2, num_threads=1, precision="fp32")
    train_grounding(spec, data, str(tiny_backbone), tmp_path / "whole", config, progress=False)
    train_grounding(spec, data, str(tiny_backbone), tmp_path / "split", config, progress=False, stop_after=2)
    train_grounding(spec, data, str(tiny_backbone), tmp_path / "split", config, progress=False, resume=True)
    for name in ("io_layers.safetensors", "adapter/adapter_model.safetensors"):
        whole, split = load_file(tmp_path / "whole/model" / name), load_file(tmp_path / "split/model" / name)
        assert whole.keys() == split.keys()
        for key in whole:
            torch.testing.assert_close(whole[key], split[key], rtol=0, atol=1e-6, msg=f"{name}:{key}")


def test_explanation_counts_exact_tasks_and_tasks_the_trajectory_achieved(monkeypatch):
    """The exact task, another relation the push made true, and one already true at
    the start: only the first is accurate, the first two are achieved."""
    import kalm.grounding.metrics as metrics
    from kalm.envs import get_spec
    from kalm.envs.clevr.tasks import Relation
    from kalm.grounding.data import ExampleSampler, GroundingEpisode

    def state(red):
        return np.array([*red, 0.3, 0.0, 0.5, -0.2, 0.0, 0.6, 0.0, 0.3], np.float32)  # purple behind cyan

    obs = np.stack([state((-0.5, 0.5)), state((0.0, 0.0))])  # red ends left of blue
    task = Relation("red", "blue", "left")
    episode = GroundingEpisode(obs, np.array([3]), True, task, task.to_json(), True, ("x",), ("x",))
    texts = ["Push the red ball to the left of the blue ball", "Push the blue ball to the right of the red ball",
             "Push the purple ball behind the cyan ball", "no instruction at all"]
    monkeypatch.setattr(metrics, "greedy_text", lambda model, prompts, n: [texts.pop(0) for _ in prompts])

    class Prompts:
        def explanation(self, observations, actions, instruction):
            return None

    class Model:
        prompts = Prompts()

    sampler = ExampleSampler(None, [episode] * 4, 16)
    result = metrics.explanation_accuracy(Model(), get_spec("clevr"), sampler, batch_size=4)
    assert result["explanation_accuracy"] == 0.25 and result["explanation_achieved"] == 0.5
    assert result["explanation_equivalent"] == 0.5  # "blue right of red" is the same goal
    # achieved: red left of blue, blue right of red, red in front of cyan, cyan behind red
    assert result["explanation_tasks_achieved"] == 4 and result["explanation_chance_among_achieved"] == 0.25
    # ... which are two goals
    assert result["explanation_goals_achieved"] == 2 and result["explanation_equivalent_chance_among_achieved"] == 0.5


def test_two_runs_with_different_precisions_share_one_process(tiny_backbone, tmp_path):
    """accelerate keeps its state process-wide; a library user grounding twice (fp32,
    then bf16) must not be refused."""
    from kalm.envs import get_spec

    spec, data = get_spec("clevr"), _dataset(n=8)
    config = GroundingConfig(steps=1, checkpoint_every=0, batch_tokens=160, max_batch_size=4, eval_episodes=1,
                             explanation_max_tokens=2, generation_max_steps=2, num_threads=1, precision="fp32")
    train_grounding(spec, data, str(tiny_backbone), tmp_path / "a", config, progress=False)
    metrics = train_grounding(spec, data, str(tiny_backbone), tmp_path / "b", replace(config, precision="bf16"),
                              progress=False)
    assert metrics["precision"] == "bf16" and (tmp_path / "b" / "model").is_dir()
    assert metrics["train_attention"] == "eager"  # the CPU default (auto)


def test_training_attention_switches_kernel_for_training_only_and_keeps_the_maths(tiny_backbone):
    """On CPU the training loop runs eager attention (faster backward there) and hands
    the backbone back its own kernel; both kernels compute the same hidden states on a
    left-padded batch, so the choice cannot change what grounding learns."""
    from kalm.grounding.finetune import _training_attention

    model = _model(tiny_backbone).eval()
    base = model.llm.get_base_model()
    own = base.config._attn_implementation
    assert own == "sdpa"
    rng = np.random.default_rng(3)
    examples = [model.prompts.generation(*_trajectory(rng, steps), "Move the red ball left of the cyan ball", True)
                for steps in (2, 5)]
    batch = collate(examples, model.pad_token_id)

    def hidden():
        embeds = model.embed_sequence(batch["input_ids"], batch["states"], batch["actions"])
        with torch.no_grad():
            out, _ = model(embeds, batch["attention_mask"], batch["position_ids"])
        return out[batch["attention_mask"].bool()]

    with _training_attention(model, "auto", on_gpu=False) as kernel:
        assert kernel == "eager" and base.config._attn_implementation == "eager"
        eager = hidden()
    assert base.config._attn_implementation == own
    torch.testing.assert_close(eager, hidden(), rtol=1e-5, atol=1e-5)
    with _training_attention(model, "auto", on_gpu=True) as kernel:
        assert kernel == own  # on GPU the backbone keeps its choice
    with pytest.raises(ValueError, match="train_attention"):
        GroundingConfig(train_attention="flash")


def _damage(ckpt, kind):
    io = ckpt / "io_layers.safetensors"
    if kind == "truncated io layers":
        io.write_bytes(io.read_bytes()[: io.stat().st_size // 2])
    elif kind == "random io layers":
        io.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "missing io layers":
        io.unlink()
    elif kind == "binary config":
        (ckpt / "grounding_config.json").write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "config not an object":
        (ckpt / "grounding_config.json").write_text("[1, 2]")
    elif kind == "random adapter":
        (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(np.random.default_rng(1).bytes(2048))
    elif kind == "broken tokenizer":
        (ckpt / "tokenizer" / "tokenizer.json").write_text("{not json")


@pytest.mark.parametrize("kind", ["truncated io layers", "random io layers", "missing io layers", "binary config",
                                  "config not an object", "random adapter", "broken tokenizer"])
def test_a_damaged_checkpoint_is_refused_naming_it(tiny_backbone, tmp_path, kind):
    _model(tiny_backbone).save(tmp_path / "ckpt")
    _damage(tmp_path / "ckpt", kind)
    with pytest.raises(GroundingCheckpointError, match=str(tmp_path / "ckpt")):
        GroundedLM.load(tmp_path / "ckpt")


def test_merged_lora_gives_the_same_outputs_and_cannot_be_saved(tiny_backbone, tmp_path):
    model = _model(tiny_backbone)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter something to merge
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    batch = _fixed_batch(model, "generation", np.random.default_rng(3))

    def hidden(m):
        with torch.no_grad():
            return m(m.embed_sequence(batch["input_ids"], batch["states"], batch["actions"]),
                     batch["attention_mask"], batch["position_ids"])[0]

    before = hidden(model)
    model.merge_lora()
    assert not any("lora" in name for name, _ in model.llm.named_parameters())
    torch.testing.assert_close(hidden(model), before, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="merged"):
        model.save(tmp_path / "merged")


def test_hindsight_share_draws_that_share_of_examples_from_the_extra_pool():
    from kalm.envs import get_spec
    from kalm.grounding.data import ExampleSampler, prepare_episodes

    spec = get_spec("clevr")
    expert, extra = prepare_episodes(_dataset(n=6), spec), prepare_episodes(_dataset(n=6, seed=1), spec)
    extra_states = {s.tobytes() for e in extra for s in e.observations}

    class Builder:  # an example is the state it starts from
        def goal(self, state, text, final):
            return state

        def dynamics(self, state, action, next_state):
            return state

    rng = np.random.default_rng(0)
    for share in (0.0, 0.3, 1.0):
        sampler = ExampleSampler(Builder(), expert, 16, extra=extra, extra_share=share)
        for task in ("goal", "dynamics"):
            from_extra = np.mean([sampler.example(task, rng).tobytes() in extra_states for _ in range(2000)])
            assert abs(from_extra - share) < 0.04, (task, share, from_extra)
    with pytest.raises(ValueError, match="none reaches its goal"):
        ExampleSampler(Builder(), expert, 16, extra=[], extra_share=0.5)


def test_growth_measurements_leave_training_unchanged_and_survive_a_resume(tiny_backbone, tmp_path):
    from safetensors.torch import load_file

    from kalm.envs import get_spec
    from kalm.files import read_curve
    from kalm.grounding.finetune import GROWTH_FILE

    spec = get_spec("clevr")
    data = _dataset()
    config = GroundingConfig(steps=5, checkpoint_every=0, batch_tokens=160, max_batch_size=4, eval_episodes=2,
                             explanation_max_tokens=2, generation_max_steps=2, num_threads=1, precision="fp32",
                             lora=LoraSettings(dropout=0.1))  # dropout draws from the random state measuring forks
    train_grounding(spec, data, str(tiny_backbone), tmp_path / "plain", config, progress=False)
    measured = replace(config, measure_at=(2, 4))
    train_grounding(spec, data, str(tiny_backbone), tmp_path / "grown", measured, progress=False, stop_after=3)
    metrics = train_grounding(spec, data, str(tiny_backbone), tmp_path / "grown", measured, progress=False,
                              resume=True)
    for name in ("io_layers.safetensors", "adapter/adapter_model.safetensors"):
        plain, grown = load_file(tmp_path / "plain/model" / name), load_file(tmp_path / "grown/model" / name)
        for key in plain:
            torch.testing.assert_close(plain[key], grown[key], rtol=0, atol=1e-6, msg=f"{name}:{key}")
    rows = read_curve(tmp_path / "grown" / GROWTH_FILE)
    assert [row["step"] for row in rows] == [2, 4, 5]
    assert rows[-1]["generation_success"] == metrics["generation_success"]
    assert rows[-1]["dynamics_median_l2"] == pytest.approx(metrics["dynamics_median_l2"])
    assert rows[0]["dynamics_median_l2"] != rows[-1]["dynamics_median_l2"]  # measured at step 2, not copied
    assert [row["step"] for row in metrics["growth"]] == [2, 4, 5]
    with pytest.raises(ValueError, match="measure_at step 5"):
        replace(config, measure_at=(5,))


def test_grounding_with_hindsight_episodes_scores_determined_explanation(tiny_backbone, tmp_path):
    from kalm.data.collect import collect_expert, collect_range
    from kalm.data.episodes import EpisodeDataset
    from kalm.data.hindsight import HindsightConfig
    from kalm.envs import get_spec

    spec = get_spec("clevr")
    hindsight_config = HindsightConfig(episodes=20, seed=1, expert_share=0.0)
    hindsight = EpisodeDataset("clevr", tuple(collect_range(spec, hindsight_config, 0, 20)), {})
    data = collect_expert(spec, episodes=10, seed=0, progress=False)
    config = GroundingConfig(steps=2, checkpoint_every=0, batch_tokens=160, max_batch_size=4, eval_episodes=3,
                             explanation_max_tokens=2, generation_max_steps=2, num_threads=1, precision="fp32",
                             validation_fraction=0.2, hindsight_share=0.5)
    metrics = train_grounding(spec, data, str(tiny_backbone), tmp_path / "g", config, progress=False,
                              hindsight=hindsight)
    assert metrics["hindsight_train_episodes"] == 16
    assert metrics["determined_explanation_episodes"] == 3
    assert 0.0 <= metrics["determined_explanation_accuracy"] <= 1.0
    assert metrics["determined_explanation_chance"] == pytest.approx(1 / 40)  # the 40 CLEVR-Robot training goals
    with pytest.raises(ValueError, match="no hindsight episodes were given"):
        train_grounding(spec, data, str(tiny_backbone), tmp_path / "h", config, progress=False)


def test_mlp_dynamics_baseline_learns_real_pushes_and_scores_the_same_transitions():
    """On real CLEVR-Robot pushes a few seconds of MLP beat copying the state; the
    held-out subset is the one the LLM's dynamics is scored on."""
    from kalm.data.collect import CollectConfig, collect_range
    from kalm.data.episodes import EpisodeDataset
    from kalm.envs import get_spec
    from kalm.grounding.data import prepare_episodes
    from kalm.grounding.dynamics_baseline import held_out_transitions, mlp_dynamics_baseline

    spec = get_spec("clevr")
    real = collect_range(spec, CollectConfig(episodes=60, epsilon=0.5), 0, 60)
    episodes = prepare_episodes(EpisodeDataset(spec.name, tuple(real), {}), spec)
    train, val = episodes[:50], episodes[50:]

    def chosen(max_transitions, seed):
        return [(id(e), t) for e, t in held_out_transitions(val, max_transitions, seed)]

    held_out = held_out_transitions(val, 10_000, seed=0)
    assert chosen(10_000, 0) == chosen(10_000, 1) and len(held_out) == sum(e.length for e in val)
    assert chosen(5, 0) == chosen(5, 0) != chosen(5, 1) and len(chosen(5, 0)) == 5
    result = mlp_dynamics_baseline(train, held_out, spec.action_dim, spec.discrete, steps=300, seed=0)
    copy = np.median([np.linalg.norm(e.observations[t + 1] - e.observations[t]) for e, t in held_out])
    assert result["mlp_dynamics_median_l2"] < 0.8 * copy, (result, copy)
    again = mlp_dynamics_baseline(train, held_out, spec.action_dim, spec.discrete, steps=300, seed=0)
    assert again["mlp_dynamics_median_l2"] == result["mlp_dynamics_median_l2"], "steps, not seconds: reproducible"
