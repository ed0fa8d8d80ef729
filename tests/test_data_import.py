"""Import of the original KALM CLEVR toy data, and refusal of malformed goal vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kalm.data.episodes import DatasetError, load_episodes, save_episodes
from kalm.data.import_kalm import goal_to_task, import_kalm_clevr
from kalm.envs import get_spec
from kalm.envs.clevr.tasks import Relation

SPEC = get_spec("clevr")
TOY = Path("/work/shared/reference/clevr_robot_kalm_toy.npz")
needs_toy = pytest.mark.skipif(not TOY.exists(), reason="reference toy data not present")


@needs_toy
def test_toy_import_agrees_with_our_predicates_and_rewards(tmp_path: Path) -> None:
    report = import_kalm_clevr(TOY, SPEC)
    data = report.dataset
    assert len(data) == 80 and data.n_transitions == 898
    assert report.success_disagreements == [] and report.instruction_disagreements == []
    assert report.shaped_reward_max_error < 1e-4
    assert {tuple(sorted(ep.task.items())) for ep in data.episodes} == {
        tuple(sorted(t.to_json().items())) for t in SPEC.training_tasks()
    }
    loaded = load_episodes(save_episodes(data, tmp_path / "toy.h5"))
    raw = np.load(TOY, allow_pickle=False)
    ep = loaded.episodes[3]
    np.testing.assert_array_equal(ep.observations[:-1], raw["observations"][3, : ep.length])
    np.testing.assert_array_equal(ep.observations[-1], raw["next_observations"][3, ep.length - 1])
    np.testing.assert_array_equal(ep.actions, raw["actions"][3, : ep.length])
    assert ep.instruction in raw["instructions"][3].tolist()


def test_goal_vectors() -> None:
    assert goal_to_task(np.array([0, 0, 0, 1, 2, 0.0]), "g") == Relation("purple", "cyan", "behind")
    assert goal_to_task(np.array([2, 1, 0, 0, 0, 3.0]), "g") == Relation("blue", "red", "right")
    bad = {
        "exactly one object": [1, 1, 2, 0, 0, 0],
        "exactly one object.*anchor": [0, 0, 0, 0, 2, 1],
        "role marks must be 0, 1": [3, 1, 2, 0, 0, 0],
        "direction must be": [1, 2, 0, 0, 0, 4],
        "whole numbers": [1, 2, 0, 0, 0, 0.5],
        "6 entries": [1, 2, 0, 0, 0],
    }
    for message, goal in bad.items():
        with pytest.raises(DatasetError, match=rf"goals\[7\]: .*{message}"):
            goal_to_task(np.array(goal, dtype=float), "goals[7]")


def _write_toy_variant(tmp_path: Path, **changes) -> Path:
    with np.load(TOY, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    arrays.update(changes)
    path = tmp_path / "variant.npz"
    np.savez(path, **arrays)
    return path


@needs_toy
def test_bad_sources_are_refused(tmp_path: Path) -> None:
    with np.load(TOY, allow_pickle=False) as raw:
        goals = raw["goals"].copy()
        observations = raw["observations"].copy()
    goals[5, 5] = 7
    with pytest.raises(DatasetError, match=r"goals\[5\]: direction must be"):
        import_kalm_clevr(_write_toy_variant(tmp_path, goals=goals), SPEC)
    observations[2, 1, 0] = np.nan
    with pytest.raises(DatasetError, match="'observations' must hold finite numbers"):
        import_kalm_clevr(_write_toy_variant(tmp_path, observations=observations), SPEC)
    pickled = _write_toy_variant(tmp_path, instructions=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DatasetError, match=r"cannot read as a pickle-free .npz"):
        import_kalm_clevr(pickled, SPEC)
    with np.load(TOY, allow_pickle=False) as raw:
        partial = {k: raw[k] for k in raw.files if k != "masks"}
    np.savez(tmp_path / "partial.npz", **partial)
    with pytest.raises(DatasetError, match=r"missing array.*'masks'"):
        import_kalm_clevr(tmp_path / "partial.npz", SPEC)
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(DatasetError, match=r"text\.npz: not an .npz archive"):
        import_kalm_clevr(text, SPEC)
