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
