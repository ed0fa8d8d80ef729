"""Evaluation: planned episodes, determinism, confidence intervals, reports, CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from kalm.cli import app
from kalm.envs import get_spec
from kalm.envs.task_file import write_task_line
from kalm.evaluation.evaluate import evaluate, plan_episodes, resolve_levels
from kalm.evaluation.policies import ExpertPolicy, RandomPolicy
from kalm.evaluation.stats import paired_difference, wilson_interval
from kalm.evaluation.tables import write_results

SPEC = get_spec("clevr")


def test_same_seed_same_results_other_seed_other_episodes():
    levels = resolve_levels(SPEC, "seen", seed=0)
    a = evaluate(RandomPolicy(SPEC), SPEC, levels, episodes=30, seed=5, progress=False)
    b = evaluate(RandomPolicy(SPEC), SPEC, levels, episodes=30, seed=5, progress=False)
    c = evaluate(RandomPolicy(SPEC), SPEC, levels, episodes=30, seed=6, progress=False)
    assert a == b
    assert [r["instruction"] for r in a["results"]] != [r["instruction"] for r in c["results"]]


def test_plan_visits_every_task_equally_often():
    instructions = SPEC.levels["hard"](0)
    n_tasks = len({json.dumps(i.task.to_json(), sort_keys=True) for i in instructions})
    plan = plan_episodes("hard", instructions, episodes=3 * n_tasks, seed=0)
    counts = Counter(json.dumps(p.instruction.task.to_json(), sort_keys=True) for p in plan)
    assert len(counts) == n_tasks and set(counts.values()) == {3}


def test_expert_solves_seen_tasks_and_random_mostly_does_not():
    levels = resolve_levels(SPEC, "seen", seed=0)
    expert = evaluate(ExpertPolicy(SPEC), SPEC, levels, episodes=20, seed=1, progress=False)["levels"]["seen"]
    random = evaluate(RandomPolicy(SPEC), SPEC, levels, episodes=20, seed=1, progress=False)["levels"]["seen"]
    assert expert["success_rate"] >= 0.9
    assert random["success_rate"] < expert["success_rate"]


def test_results_are_reported_per_task_kind():
    levels = resolve_levels(SPEC, "hard", seed=0)
    report = evaluate(RandomPolicy(SPEC), SPEC, levels, episodes=12, seed=0, progress=False)
    by_kind = report["levels"]["hard"]["by_kind"]
    assert set(by_kind) <= {"all_of", "line", "circle"}
    assert sum(k["episodes"] for k in by_kind.values()) == 12


def test_lockstep_batches_score_every_episode_as_one_at_a_time(observation_hash_policy):
    """Batches of 3 over 10 episodes (the last batch a single one) must reproduce the
    one-episode-at-a-time run exactly: same starts, observations, stops, steps and
    successes."""
    levels = {**resolve_levels(SPEC, "seen", seed=0), **resolve_levels(SPEC, "easy", seed=0)}
    one, three = observation_hash_policy(SPEC, batch_size=1), observation_hash_policy(SPEC, batch_size=3)
    alone = evaluate(one, SPEC, levels, episodes=5, seed=4, progress=False)
    batched = evaluate(three, SPEC, levels, episodes=5, seed=4, progress=False)
    assert batched["results"] == alone["results"]
    assert three.same_as(one)
    outcomes = {r["success"] for r in alone["results"]}
    assert outcomes == {True, False}, "the check needs episodes that succeed early and episodes that run out"


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (3, 7), (50, 100), (0, 0)])
def test_wilson_interval_contains_the_rate_and_stays_in_unit_range(k, n):
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= high <= 1.0
    if n:
        assert low <= k / n <= high


def test_wilson_interval_matches_a_known_value():
    low, high = wilson_interval(81, 263)  # Wilson 1927 / standard textbook example
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def test_report_writes_json_and_markdown(tmp_path):
    report = evaluate(RandomPolicy(SPEC), SPEC, resolve_levels(SPEC, "easy", 0), episodes=4, seed=0, progress=False)
    json_path, md_path = write_results(report, tmp_path / "r.json")
    assert json.loads(json_path.read_text())["levels"]["easy"]["episodes"] == 4
    assert "| random | easy | all | 4 |" in md_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_cli_evaluates_a_task_file_with_a_baseline(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(write_task_line(i) for i in SPEC.levels["easy"](0)[:3]) + "\n")
    out = tmp_path / "out.json"
    result = CliRunner().invoke(
        app, ["evaluate", "--baseline", "expert", "--env", "clevr", "--tasks", str(tasks), "--episodes", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["levels"]["tasks:tasks.jsonl"]["episodes"] == 3


def test_cli_refuses_a_bad_task_file_by_line(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"instruction": "x", "task": {"kind": "line"}}\n{"instruction": 1}\n')
    result = CliRunner().invoke(app, ["evaluate", "--baseline", "random", "--env", "clevr", "--tasks", str(tasks)])
    assert result.exit_code == 2
    assert f"{tasks}:2:" in result.output


def test_cli_needs_exactly_one_policy(tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--level", "seen"])
    assert result.exit_code == 2 and "exactly one of --policy" in result.output


def test_paired_difference_is_the_mean_per_episode_difference_with_a_normal_interval():
    mean, low, high = paired_difference([1, 1, 0, 0, 1], [0, 1, 0, 1, 0])
    # differences 1, 0, 0, -1, 1: mean 0.2, sample variance 0.7
    assert mean == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.2 - 1.959964 * (0.7 / 5) ** 0.5, 0.2 + 1.959964 * (0.7 / 5) ** 0.5))
    assert paired_difference([True] * 50, [True] * 50) == (0.0, 0.0, 0.0)  # identical outcomes: no spread
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 0], [1])
