"""The imagination ablation without an LLM: a real-data policy acting in an MLP dynamics
model, through the same prompts, filters and labels as LLM imagination."""

from __future__ import annotations

import numpy as np
import pytest

from kalm.data.collect import collect_expert
from kalm.data.episodes import save_episodes
from kalm.envs import get_spec
from kalm.grounding.dynamics_baseline import MLPDynamics
from kalm.imagine.generate import GenerationConfig, stop_at_goal
from kalm.imagine.rollouts import ImagineConfig, sample_prompts
from kalm.imagine.without_llm import PolicyDynamicsRollouts, fit_dynamics, imagine_without_llm
from kalm.offline.config import TrainConfig
from kalm.offline.policy import LanguagePolicy
from kalm.offline.train import train

SPEC = get_spec("clevr")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BC policy and an MLP dynamics model, both from the same 60 expert episodes."""
    root = tmp_path_factory.mktemp("no_llm")
    dataset = collect_expert(SPEC, episodes=60, seed=0, epsilon=0.1, progress=False)
    real = save_episodes(dataset, root / "real.h5")
    train(real, root / "policy", TrainConfig(algo="bc", steps=60, seed=0, encoder="minilm"), progress=False)
    dynamics, info = fit_dynamics(dataset, SPEC, steps=300, seed=0)
    dynamics.save(root / "dynamics.safetensors")
    return root, dataset, info


def test_dynamics_model_learns_pushes_and_round_trips_through_safetensors(trained, tmp_path):
    root, dataset, info = trained
    assert info["transitions"] == sum(len(e.actions) for e in dataset.episodes) and info["best_step"] > 0
    loaded = MLPDynamics.load(root / "dynamics.safetensors")
    states = np.stack([e.observations[0] for e in dataset.episodes])
    actions = np.array([e.actions[0] for e in dataset.episodes])
    nexts = np.stack([e.observations[1] for e in dataset.episodes])
    predicted = loaded.predict(states, actions)
    model, _ = fit_dynamics(dataset, SPEC, steps=300, seed=0)
    np.testing.assert_array_equal(predicted, model.predict(states, actions))  # seeded, and saved exactly
    # on its training pushes it beats predicting no change by a wide margin
    assert np.median(np.linalg.norm(predicted - nexts, axis=1)) < 0.5 * np.median(np.linalg.norm(states - nexts,
                                                                                                   axis=1))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not an MLP dynamics model"):
        MLPDynamics.load(broken)
    with pytest.raises(FileNotFoundError, match="not found"):
        MLPDynamics.load(tmp_path / "missing.safetensors")


def test_rollouts_are_the_policy_acting_in_the_dynamics_model(trained):
    root, _, _ = trained
    policy, dynamics = LanguagePolicy(root / "policy"), MLPDynamics.load(root / "dynamics.safetensors")
    source = PolicyDynamicsRollouts(policy, dynamics)
    instructions, starts = sample_prompts(SPEC, "easy", 8, seed=1)
    texts = [i.text for i in instructions]
    config = GenerationConfig(max_steps=4, batch_size=3)
    rollouts = source.generate(texts, starts, config, None, 0, None, ())
    for rollout, text, start in zip(rollouts, texts, starts):
        assert rollout.instruction == text and len(rollout.actions) == 4 and rollout.stopped_by == "horizon"
        np.testing.assert_array_equal(rollout.states[0], start)
        embedding = policy.embed(text)
        for t, action in enumerate(rollout.actions):
            assert action == policy.act(rollout.states[t], embedding)  # greedy at temperature 0
            np.testing.assert_allclose(rollout.states[t + 1], dynamics.predict(rollout.states[t][None],
                                                                               np.array([action]))[0], atol=1e-6)
    # sampled: seeded, and not the greedy rollouts
    warm = GenerationConfig(max_steps=4, batch_size=3, temperature=1.0)
    sampled = [r.actions for r in source.generate(texts, starts, warm, None, 5, None, ())]
    again = [r.actions for r in source.generate(texts, starts, warm, None, 5, None, ())]
    assert all(np.array_equal(a, b) for a, b in zip(sampled, again))
    assert any(not np.array_equal(a, r.actions) for a, r in zip(sampled, rollouts))
    # the caller's stop function ends a rollout where its task holds in imagination
    tasks = [i.task for i in instructions]
    stopped = source.generate(texts, starts, GenerationConfig(max_steps=6), stop_at_goal(tasks, starts, [6] * 8), 0,
                              None, ())
    for rollout, task, start in zip(stopped, tasks, starts):
        holds = [task.success(s, start) for s in rollout.states[1:]]
        assert rollout.stopped_by == "stop" and not any(holds[:-1]) and (holds[-1] or len(rollout.actions) == 6)
    assert any(len(r.actions) < 6 for r in stopped)


def test_imagine_without_llm_labels_filters_and_names_its_source(trained):
    root, _, _ = trained
    config = ImagineConfig(level="easy", n=24, seed=0, generation=GenerationConfig(max_steps=5))
    result = imagine_without_llm(root / "policy", root / "dynamics.safetensors", SPEC, config, progress=False)
    counts = result.stats["counts"]
    assert counts["generated"] == 24 and len(result.attempts) == 24
    assert counts["kept"] == counts["succeeded"] - counts["dropped_fragile"]
    if result.dataset is not None:
        assert result.dataset.metadata["source"] == "imagined without an LLM"
        for episode in result.dataset.episodes:
            task = SPEC.parse_task(episode.task)
            assert episode.terminated and task.success(episode.observations[-1], episode.observations[0])
    with pytest.raises(ValueError, match="trained on 'clevr', not 'metaworld'"):
        imagine_without_llm(root / "policy", root / "dynamics.safetensors", get_spec("metaworld"), config)


def test_imagine_command_runs_the_ablation_from_a_policy_and_real_data(trained, tmp_path):
    from typer.testing import CliRunner

    from kalm.cli import app
    from kalm.data.episodes import load_episodes

    root, _, _ = trained
    out = tmp_path / "easy.h5"
    args = ["imagine", "--policy", str(root / "policy"), "--real", str(root / "real.h5"), "--dynamics-steps", "100",
            "--level", "easy", "--n", "6", "--max-steps", "3", "--keep-failures", "--no-physics-filter",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    dataset = load_episodes(out, SPEC)
    assert len(dataset.episodes) == 6 and dataset.metadata["source"] == "imagined without an LLM"
    assert MLPDynamics.load(tmp_path / "easy.h5.dynamics.safetensors").state_dim == SPEC.state_dim
    for extra, message in (([], "needs --real"), (["--real", str(root / "real.h5"), "--explain-back"], "needs the LLM"),
                           (["--model", str(root)], "exactly one of --model")):
        refused = CliRunner().invoke(app, ["imagine", "--policy", str(root / "policy"), "--level", "easy",
                                           "--out", str(tmp_path / "x.h5"), *extra])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert not (tmp_path / "x.h5").exists()


def test_the_policys_action_distribution_peaks_at_its_greedy_action(trained):
    """Sampling reads the same network as greedy acting, observation scaling included."""
    root, dataset, _ = trained
    policy = LanguagePolicy(root / "policy")
    states = np.stack([e.observations[0] for e in dataset.episodes])
    embeddings = policy.encoder.encode([e.instruction for e in dataset.episodes])
    probs = policy.action_probabilities(states, embeddings, temperature=1.0)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(probs.argmax(1), policy.act_batch(states, embeddings))
    sharp = policy.action_probabilities(states, embeddings, temperature=0.1)
    assert (sharp.max(1) >= probs.max(1) - 1e-9).all()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        policy.action_probabilities(states, embeddings, temperature=0.0)


def test_sampled_evaluation_is_seeded_and_not_greedy(trained):
    from kalm.evaluation.evaluate import plan_episodes, run_episode
    from kalm.evaluation.policies import TrainedPolicy

    root, _, _ = trained
    levels = {"seen": SPEC.levels["seen"](0)[:20]}

    def actions(policy, seed):  # the states each episode passed through
        trajectories = []
        env = SPEC.make_env()
        for name, instructions in levels.items():
            for planned in plan_episodes(name, instructions, 12, seed):
                trajectories.append([])
                run_episode(env, SPEC, policy, planned, trajectories[-1])
        return [np.stack(t).round(5).tolist() for t in trajectories]

    sampled = TrainedPolicy(root / "policy", temperature=1.0)
    assert sampled.name.endswith("@T1")
    assert actions(sampled, 3) == actions(TrainedPolicy(root / "policy", temperature=1.0), 3)
    assert actions(sampled, 3) != actions(TrainedPolicy(root / "policy"), 3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        TrainedPolicy(root / "policy", temperature=-1.0)
