"""Training end to end on a small expert dataset: learning, resuming, refusing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kalm.data.collect import CollectConfig, collect_episode
from kalm.data.episodes import EpisodeDataset, save_episodes
from kalm.envs import get_spec
from kalm.evaluation.evaluate import evaluate
from kalm.evaluation.policies import RandomPolicy, TrainedPolicy
from kalm.files import read_curve
from kalm.offline.config import TrainConfig
from kalm.offline.policy import LanguagePolicy
from kalm.offline.train import train

SPEC = get_spec("clevr")


# Four goals about one pair of balls (red relative to blue, in each direction): small
# enough that a few hundred BC steps learn them, and the directions can only be told
# apart through the instruction.
N_GOALS = 4
EPISODES_PER_GOAL = 40


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    config = CollectConfig(episodes=1, seed=0, epsilon=0.1, reward="shaped")
    n_tasks = len(SPEC.training_tasks())
    env = SPEC.make_env()
    try:
        episodes = [
            collect_episode(SPEC, env, goal + n_tasks * j, config)
            for j in range(EPISODES_PER_GOAL)
            for goal in range(N_GOALS)
        ]
    finally:
        env.close()
    dataset = EpisodeDataset(env=SPEC.name, episodes=tuple(episodes), metadata={"source": "expert", "test": True})
    return save_episodes(dataset, tmp_path_factory.mktemp("data") / "expert.h5")


def test_bc_on_expert_data_beats_the_random_policy_on_seen_tasks(expert_file, tmp_path):
    # Mean pooling suffices here (the four goals differ only in the direction word) and
    # learns faster than the default order-aware pooling over these few hundred steps.
    config = TrainConfig(algo="bc", steps=800, seed=0, encoder="minilm")
    train(expert_file, tmp_path / "bc", config, progress=False)
    goals = {json.dumps(t.to_json()) for t in SPEC.training_tasks()[:N_GOALS]}
    seen = [i for i in SPEC.levels["seen"](0) if json.dumps(i.task.to_json()) in goals]
    levels = {"seen": seen}
    trained = evaluate(TrainedPolicy(tmp_path / "bc"), SPEC, levels, episodes=60, seed=3, progress=False)
    random = evaluate(RandomPolicy(SPEC), SPEC, levels, episodes=60, seed=3, progress=False)
    trained_seen, random_seen = trained["levels"]["seen"], random["levels"]["seen"]
    # Same 60 episodes for both (paired); the trained policy's whole 95% interval lies
    # above the random policy's rate.
    assert trained_seen["ci95"][0] > random_seen["success_rate"], (trained_seen, random_seen)


def _weights(policy_dir):
    return torch.load(policy_dir / "model.pt", map_location="cpu", weights_only=True)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(expert_file, tmp_path):
    config = TrainConfig(algo="cql", steps=60, checkpoint_every=20, seed=1, reward="sparse")
    train(expert_file, tmp_path / "whole", config, progress=False)

    first = train(expert_file, tmp_path / "cut", config, progress=False, stop_after=40)
    assert first.steps == 40
    assert not (tmp_path / "cut" / "model.pt").exists()
    with pytest.raises(ValueError, match="unfinished run"):
        LanguagePolicy(tmp_path / "cut")
    resumed = train(expert_file, tmp_path / "cut", config, progress=False, resume=True)

    assert resumed.steps == 60
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["completed_steps"] == 60
    assert [row["step"] for row in read_curve(tmp_path / "cut" / "curve.csv")] == list(range(1, 61))
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for module in whole:
        for name, tensor in whole[module].items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, cut[module][name]), (module, name)


def test_a_run_written_before_a_config_field_existed_still_resumes(expert_file, tmp_path):
    config = TrainConfig(steps=10, checkpoint_every=5)
    train(expert_file, tmp_path / "run", config, progress=False, stop_after=5)
    path = tmp_path / "run" / "config.json"
    stored = json.loads(path.read_text())
    del stored["train"]["imaginary_mix"]  # as written before the field existed
    path.write_text(json.dumps(stored))
    assert train(expert_file, tmp_path / "run", config, progress=False, resume=True).steps == 10


def test_per_source_mixing_trains_on_each_imaginary_file(expert_file, tmp_path):
    config = TrainConfig(steps=4, checkpoint_every=2, imaginary_ratio=0.5, imaginary_mix="per_source")
    train(expert_file, tmp_path / "run", config, imaginary=[expert_file, expert_file], progress=False)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    real = stored["real_transitions"]
    assert stored["train"]["imaginary_mix"] == "per_source" and stored["imaginary_transitions"] == 2 * real
    assert stored["batch_imaginary"] == stored["batch_real"]


def test_resume_refuses_a_different_configuration(expert_file, tmp_path):
    train(expert_file, tmp_path / "run", TrainConfig(steps=10, checkpoint_every=5), progress=False, stop_after=5)
    with pytest.raises(ValueError, match="cannot resume"):
        train(expert_file, tmp_path / "run", TrainConfig(steps=10, checkpoint_every=5, seed=9), resume=True, progress=False)


def test_an_existing_run_is_not_overwritten_without_resume(expert_file, tmp_path):
    train(expert_file, tmp_path / "run", TrainConfig(steps=5), progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(expert_file, tmp_path / "run", TrainConfig(steps=5), progress=False)


def test_policy_directory_is_self_describing_and_loads_without_pickle(expert_file, tmp_path):
    train(expert_file, tmp_path / "p", TrainConfig(algo="cql", steps=5), progress=False)
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == ["algo.json", "checkpoint", "config.json", "curve.csv", "model.pt"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["train"]["algo"] == "cql" and config["encoder"] == "minilm-seg3" and config["action_size"] == 40
    policy = LanguagePolicy(tmp_path / "p")
    action = policy.act(np.zeros(SPEC.state_dim, np.float32), policy.embed("Push the red ball behind the blue ball"))
    assert 0 <= action < 40


def test_a_tampered_model_file_is_refused(expert_file, tmp_path):
    train(expert_file, tmp_path / "p", TrainConfig(steps=5), progress=False)
    (tmp_path / "p" / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights-only"):
        LanguagePolicy(tmp_path / "p")


DISCRETE_ALGOS = ("bc", "cql", "bcq", "dt")


@pytest.fixture(scope="module")
def trained(expert_file, tmp_path_factory):
    """One short run of every discrete algorithm on the same data."""
    root = tmp_path_factory.mktemp("algos")
    for algo in DISCRETE_ALGOS:
        train(expert_file, root / algo, TrainConfig(algo=algo, steps=30, checkpoint_every=10), progress=False)
    return root


@pytest.mark.parametrize("algo", DISCRETE_ALGOS)
def test_every_algorithm_round_trips_its_policy_directory(trained, algo):
    from kalm.offline.policy_files import create_algo, load_weights

    policy = LanguagePolicy(trained / algo)
    rebuilt = create_algo(trained / algo / "algo.json")
    load_weights(rebuilt, trained / algo / "checkpoint" / "model-000000030.pt")  # the last checkpoint, same step
    states = np.random.default_rng(0).uniform(-1, 1, size=(6, SPEC.state_dim)).astype(np.float32)
    embedding = policy.embed("Push the red ball behind the blue ball")
    if policy.is_sequence_model:
        def actions(p):
            act = p.episode_actor(embedding, SPEC.training_tasks()[0], states[0])
            return [act(s) for s in states]
        twin = LanguagePolicy(trained / algo)
        twin.algo = rebuilt
        assert actions(policy) == actions(twin)
    else:
        x = np.concatenate([states, np.broadcast_to(embedding, (6, len(embedding)))], 1)
        assert np.array_equal(policy.act_batch(states, np.broadcast_to(embedding, (6, len(embedding)))),
                              rebuilt.predict(x))


@pytest.mark.parametrize(("owner", "intruder"), [("bc", "cql"), ("cql", "bcq"), ("bcq", "dt"), ("dt", "bc")])
def test_a_policy_refuses_the_weights_or_config_of_another_algorithm(trained, tmp_path, owner, intruder):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(trained / owner, mixed)
    shutil.copy(trained / intruder / "model.pt", mixed / "model.pt")
    with pytest.raises(ValueError, match="networks of another algorithm"):
        LanguagePolicy(mixed)
    shutil.copy(trained / owner / "model.pt", mixed / "model.pt")
    shutil.copy(trained / intruder / "algo.json", mixed / "algo.json")
    with pytest.raises(ValueError, match="files of two runs are mixed"):
        LanguagePolicy(mixed)


def test_the_decision_transformer_learns_and_acts_in_the_env(expert_file, tmp_path):
    result = train(expert_file, tmp_path / "dt", TrainConfig(algo="dt", steps=200, checkpoint_every=100),
                   progress=False)
    losses = [row["loss"] for row in read_curve(tmp_path / "dt" / "curve.csv")]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    stored = json.loads((tmp_path / "dt" / "config.json").read_text())
    assert stored["target_return"] == 1.0  # sparse reward: the best real episode succeeded
    policy = TrainedPolicy(tmp_path / "dt", temperature=1.0)
    with pytest.raises(ValueError, match="sequence model"):
        policy.policy.act(np.zeros(SPEC.state_dim, np.float32), policy.policy.embed("Push the red ball left"))
    levels = {"seen": SPEC.levels["seen"](0)}
    outcome = evaluate(policy, SPEC, levels, episodes=8, seed=5, progress=False)["levels"]["seen"]
    assert outcome["episodes"] == 8 and result.steps == 200


@pytest.mark.parametrize("algo", ["bc", "dt"])
def test_sampled_evaluation_is_seeded_and_reproducible(trained, algo):
    levels = {"seen": SPEC.levels["seen"](0)}

    def outcomes(seed):
        run = evaluate(TrainedPolicy(trained / algo, temperature=3.0), SPEC, levels, episodes=6, seed=seed,
                       progress=False)
        return [(r["success"], r["steps"]) for r in run["results"]]

    assert outcomes(11) == outcomes(11)


@pytest.mark.parametrize(("algo", "acting"), [("bc", {"temperature": 3.0}), ("bc", {}),
                                              ("bc", {"temperature": 3.0, "epsilon": 0.3}), ("cql", {"epsilon": 0.3})])
def test_lockstep_evaluation_acts_as_one_episode_at_a_time(trained, algo, acting):
    class OneAtATime:  # the same policy without begin_batch: evaluation runs episodes alone
        def __init__(self, policy):
            self.name, self.begin = policy.name, policy.begin

    levels = {"seen": SPEC.levels["seen"](0), "easy": SPEC.levels["easy"](0)}
    policy = TrainedPolicy(trained / algo, **acting)
    assert policy.batch_size > 1
    together = evaluate(policy, SPEC, levels, episodes=24, seed=4, progress=False)["results"]
    alone = evaluate(OneAtATime(policy), SPEC, levels, episodes=24, seed=4, progress=False)["results"]
    assert [(r["success"], r["steps"]) for r in together] == [(r["success"], r["steps"]) for r in alone]
    assert len({r["steps"] for r in alone}) > 1, "episodes that all end alike would not show a mix-up"


@pytest.mark.parametrize("algo", ["cql", "bcq"])
def test_q_learners_refuse_to_sample_but_act_epsilon_greedily(trained, algo):
    with pytest.raises(ValueError, match="only acts greedily"):
        TrainedPolicy(trained / algo, temperature=1.0)
    policy = TrainedPolicy(trained / algo, epsilon=0.1)
    run = evaluate(policy, SPEC, {"seen": SPEC.levels["seen"](0)}, episodes=4, seed=2, progress=False)
    assert run["levels"]["seen"]["episodes"] == 4 and policy.name.endswith("@eps0.1")


def test_a_resumed_decision_transformer_ends_where_an_uninterrupted_one_does(expert_file, tmp_path):
    config = TrainConfig(algo="dt", steps=20, checkpoint_every=10, seed=3)
    train(expert_file, tmp_path / "whole", config, progress=False)
    train(expert_file, tmp_path / "cut", config, progress=False, stop_after=10)
    train(expert_file, tmp_path / "cut", config, progress=False, resume=True)
    whole, cut = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    for module in whole:
        for name, tensor in whole[module].items():
            if isinstance(tensor, torch.Tensor):
                assert torch.equal(tensor, cut[module][name]), (module, name)


def test_paper_hyperparameters_fill_table_3():
    cql = TrainConfig(algo="cql", hyperparameters="paper").for_action_space(True)
    assert (cql.batch_size, cql.learning_rate, cql.target_update_interval) == (32, 6.25e-5, 8000)
    td3 = TrainConfig(algo="td3plusbc", hyperparameters="paper").for_action_space(False)
    assert (td3.batch_size, td3.learning_rate, td3.td3_alpha) == (256, 3e-4, 0.5)
    awac = TrainConfig(algo="awac", hyperparameters="paper").for_action_space(False)
    assert (awac.batch_size, awac.awac_lambda) == (1024, 1.0)
    with pytest.raises(ValueError, match="not available for discrete"):
        TrainConfig(algo="awac").for_action_space(True)
    with pytest.raises(ValueError, match="hyperparameters"):
        TrainConfig(hyperparameters="iclr")
