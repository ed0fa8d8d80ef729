"""Task predicates on hand-made states, JSON round trips, refusals, and the phrasings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kalm.envs import TaskSpecError, get_spec
from kalm.envs.clevr import language
from kalm.envs.clevr.tasks import (
    COLOURS,
    DIRECTIONS,
    AllOf,
    Circle,
    Line,
    Push,
    Relation,
    hard_tasks,
    parse_task,
    push_tasks,
    relation_goals,
)


def state_with(**balls: tuple[float, float]) -> np.ndarray:
    """Balls far apart by default; named ones placed where given."""
    default = {"red": (-0.4, -0.1), "blue": (0.4, -0.1), "green": (0.0, 0.2), "purple": (-0.4, 0.5), "cyan": (0.4, 0.5)}
    default.update(balls)
    return np.array([v for c in COLOURS for v in default[c]], dtype=np.float32)


@pytest.mark.parametrize(
    "direction, offset",
    [("left", (-0.3, 0.0)), ("right", (0.3, 0.05)), ("behind", (0.05, 0.3)), ("front", (-0.1, -0.3))],
)
def test_relation_holds_in_its_sector_and_only_there(direction, offset):
    anchor = np.array([0.0, 0.2])
    state = state_with(red=tuple(anchor + offset), green=tuple(anchor))
    assert Relation("red", "green", direction).success(state)
    for other in DIRECTIONS:
        if other != direction:
            assert not Relation("red", "green", other).success(state)


def test_relation_needs_closeness():
    near = state_with(red=(-0.35, 0.2), green=(0.0, 0.2))
    far = state_with(red=(-0.4, 0.2), green=(0.0, 0.2))
    assert Relation("red", "green", "left").success(near)
    assert not Relation("red", "green", "left").success(far)  # 0.40 > 0.39


def test_relation_sector_border_at_45_degrees():
    on_diag_left_behind = state_with(red=(-0.2, 0.2 + 0.21), green=(0.0, 0.2))  # 46 deg past left, in behind
    assert Relation("red", "green", "behind").success(on_diag_left_behind)
    assert not Relation("red", "green", "left").success(on_diag_left_behind)


def test_push_needs_motion_along_its_direction():
    start = state_with(blue=(0.0, 0.0))
    assert Push("blue", "behind").success(state_with(blue=(0.05, 0.2)), start)
    assert not Push("blue", "behind").success(state_with(blue=(0.0, 0.1)), start)  # too short
    assert not Push("blue", "behind").success(state_with(blue=(0.2, 0.15)), start)  # > 45 deg off
    assert not Push("blue", "front").success(state_with(blue=(0.0, 0.2)), start)


def test_all_of_needs_every_part():
    state = state_with(red=(-0.3, 0.2), green=(0.0, 0.2), cyan=(0.3, 0.2))
    left, right = Relation("red", "green", "left"), Relation("cyan", "green", "right")
    assert AllOf((left, right)).success(state)
    assert not AllOf((left, Relation("cyan", "green", "behind"))).success(state)


def test_line_in_colour_order():
    xs = np.linspace(-0.45, 0.45, 5)
    line = np.array([v for x in xs for v in (x, 0.2 + 0.05 * x)], dtype=np.float32)
    assert Line().success(line)
    swapped = line.copy()
    swapped[[0, 1, 2, 3]] = swapped[[2, 3, 0, 1]]
    assert not Line().success(swapped)
    steep = line.copy()
    steep[3] += 0.3  # blue lifted: red->blue about 53 degrees
    assert not Line().success(steep)


def test_circle_around_a_centre():
    ring = state_with(green=(0.0, 0.2), red=(-0.3, 0.2), blue=(0.3, 0.2), purple=(0.0, 0.5), cyan=(0.0, -0.1))
    assert Circle("green").success(ring)
    assert not Circle("red").success(ring)
    assert not Circle("green").success(state_with())


def test_costs_vanish_exactly_on_success():
    rng = np.random.default_rng(0)
    tasks = relation_goals()[:10] + push_tasks()[:4] + hard_tasks()
    for _ in range(200):
        start = rng.uniform(-0.45, 0.45, 10).astype(np.float32)
        state = rng.uniform(-0.45, 0.45, 10).astype(np.float32)
        for task in tasks:
            cost = task.cost(state, start)
            assert cost >= 0
            assert (cost == 0) == task.success(state, start)


def test_level_sizes_and_kinds():
    spec = get_spec("clevr")
    assert len(relation_goals()) == 80 and len(set(relation_goals())) == 80
    assert {i.task.kind for i in spec.levels["seen"](0)} == {"relation"}
    assert {i.task.kind for i in spec.levels["rephrase"](0)} == {"relation"}
    assert {i.task.kind for i in spec.levels["easy"](0)} == {"push"}
    assert {i.task.kind for i in spec.levels["hard"](0)} == {"all_of", "line", "circle"}


@pytest.mark.parametrize("task", relation_goals()[:8] + push_tasks()[:3] + hard_tasks()[::9])
def test_json_round_trip(task):
    text = json.dumps(task.to_json())
    assert parse_task(json.loads(text)) == task


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"kind": "relation", "object": "pink", "anchor": "blue", "direction": "left"}, ["task.object", "pink"]),
        ({"kind": "relation", "object": "red", "anchor": "blue", "direction": "up"}, ["task.direction", "up"]),
        ({"kind": "relation", "object": "red", "anchor": "red", "direction": "left"}, ["task.anchor", "same ball"]),
        ({"kind": "relation", "object": "red", "direction": "left"}, ["missing field 'anchor'"]),
        ({"kind": "relation", "object": 3, "anchor": "blue", "direction": "left"}, ["task.object", "string"]),
        ({"kind": "spin"}, ["task.kind", "spin"]),
        ({"object": "red"}, ["missing field 'kind'"]),
        ({"kind": "all_of", "tasks": []}, ["task.tasks", "at least one"]),
        ({"kind": "all_of", "tasks": [{"kind": "push", "object": "red", "direction": "west"}]}, ["task.tasks[0].direction"]),
        ({"kind": "line", "colour": "red"}, ["unexpected field 'colour'"]),
        ({"kind": "circle", "center": ["green"]}, ["task.center"]),
        ([1, 2], ["expected an object"]),
    ],
)
def test_bad_specs_are_refused_naming_the_field(spec, words):
    with pytest.raises(TaskSpecError) as err:
        parse_task(spec)
    for word in words:
        assert word in str(err.value)


def test_absurd_nesting_is_refused_clearly():
    spec: dict = {"kind": "line"}
    for _ in range(50):
        spec = {"kind": "all_of", "tasks": [spec]}
    with pytest.raises(TaskSpecError, match="nested deeper"):
        parse_task(spec)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
task_like = st.fixed_dictionaries(
    {"kind": st.sampled_from(["relation", "push", "all_of", "line", "circle", "bogus"])},
    optional={
        "object": st.sampled_from(COLOURS) | json_values,
        "anchor": st.sampled_from(COLOURS) | json_values,
        "direction": st.sampled_from(list(DIRECTIONS)) | json_values,
        "center": st.sampled_from(COLOURS) | json_values,
        "tasks": st.lists(json_values, max_size=3),
    },
)


@given(st.one_of(json_values, task_like))
def test_parser_accepts_or_refuses_with_task_spec_error(value):
    try:
        task = parse_task(value)
    except TaskSpecError as err:
        assert str(err).startswith("task")
    else:
        assert parse_task(task.to_json()) == task


# ---------------------------------------------------------------- language
def _frames_of(texts: list[str]) -> set[str]:
    """Reduce phrasings to their frame by blanking colours and relation words."""
    import re

    words = "|".join(COLOURS)
    return {re.sub(rf"\b({words})\b", "_", t.lower()) for t in texts}


def test_held_out_phrasings_share_no_template_with_training_ones():
    assert not set(language.TRAINING_FRAMES) & set(language.REPHRASE_FRAMES)
    for goal in relation_goals():
        train = set(language.training_phrasings(goal))
        held_out = set(language.rephrasings(goal))
        assert not train & held_out
        assert not _frames_of(list(train)) & _frames_of(list(held_out))


def test_novel_phrasings_never_label_training_data():
    spec = get_spec("clevr")
    training = {i.text for i in spec.levels["seen"](0)}
    for level in ("rephrase", "easy", "hard"):
        assert not training & {i.text for i in spec.levels[level](0)}


def test_training_phrasings_parse_back_to_their_goal():
    for goal in relation_goals():
        for text in language.training_phrasings(goal):
            assert language.parse_instruction(text) == goal, text


def test_push_phrasings_parse_back_to_their_task():
    for task in push_tasks():
        for text in language.novel_phrasings(task):
            assert language.parse_instruction(text) == task, text


def test_parse_instruction_gives_up_on_unclear_text():
    assert language.parse_instruction("hello there") is None
    assert language.parse_instruction("Put the red ball left of the blue ball and right of it") is None


def test_training_instruction_is_seeded():
    goal = relation_goals()[5]
    a = language.training_instruction(goal, np.random.default_rng(1))
    b = language.training_instruction(goal, np.random.default_rng(1))
    assert a == b and a in language.training_phrasings(goal)


def test_mirrored_relations_are_one_goal():
    """"red left of blue" and "blue right of red" hold on exactly the same states,
    so they share a canonical form; different goals do not."""
    from kalm.envs.clevr.tasks import OPPOSITE, relation_goals
    from kalm.envs.spec import same_task

    goals = relation_goals()
    rng = np.random.default_rng(0)
    states = rng.uniform(-0.5, 0.5, size=(4000, 10)).astype(np.float32)
    for goal in goals:
        mirror = goal.canonical()
        if mirror == goal:
            mirror = Relation(goal.anchor, goal.object, OPPOSITE[goal.direction])
        assert mirror != goal and same_task(goal, mirror)
        assert [goal.success(s) for s in states] == [mirror.success(s) for s in states]
    assert len({str(g.canonical().to_json()) for g in goals}) == 40
    assert not same_task(Relation("red", "blue", "left"), Relation("blue", "red", "left"))
