"""Task files: valid lines round-trip, every malformed line is refused by number."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kalm.envs import get_spec
from kalm.envs.task_file import TaskFileError, read_task_file, write_task_line

SPEC = get_spec("clevr")
GOOD = json.dumps(
    {"instruction": "Push the red ball behind the blue ball", "task": {"kind": "relation", "object": "red", "anchor": "blue", "direction": "behind"}}
)


def _write(tmp_path, content: bytes):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(content)
    return path


def test_valid_file_round_trips_every_level_instruction(tmp_path):
    instructions = [ins for level in SPEC.levels.values() for ins in level(0)[:7]]
    path = _write(tmp_path, ("\n".join(write_task_line(i) for i in instructions) + "\n\n").encode())
    read = read_task_file(path, SPEC.parse_task)
    assert [(i.text, i.task) for i in read] == [(i.text, i.task) for i in instructions]


BAD_LINES = {
    b'{"instruction": "x", "task": {"kind": "line"}': "invalid JSON",
    b'{"instruction": "x", "task": {"kind": "line"}, "extra": 1}': "unexpected field 'extra'",
    b'{"task": {"kind": "line"}}': "missing field 'instruction'",
    b'{"instruction": "", "task": {"kind": "line"}}': "non-empty string",
    b'{"instruction": "x", "task": {"kind": "circle", "center": "pink"}}': "unknown colour 'pink'",
    b'{"instruction": "x", "task": {"kind": "line"}, "instruction": "y"}': "duplicate key 'instruction'",
    b'{"instruction": "x", "task": NaN}': "NaN is not valid JSON",
    b'{"instruction": "x", "task": {"kind": "push", "object": "red", "direction": Infinity}}': "Infinity",
    b'["instruction", "task"]': "expected a JSON object",
    b'{"instruction": "caf\xe9", "task": {"kind": "line"}}': "not UTF-8",
    b"[" * 100000 + b"]" * 100000: "nested 100000 levels",
    b'{"instruction": "x", "task": ' + b'{"kind": "all_of", "tasks": [' * 6 + b'{"kind": "line"}' + b"]}" * 6 + b"}": "nested deeper",
}


@pytest.mark.parametrize("bad, message", list(BAD_LINES.items()), ids=list(BAD_LINES.values()))
def test_malformed_line_is_refused_with_its_number(tmp_path, bad, message):
    path = _write(tmp_path, GOOD.encode() + b"\n\n" + bad + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(TaskFileError) as info:
        read_task_file(path, SPEC.parse_task)
    assert f"{path}:3:" in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files_are_refused(tmp_path):
    with pytest.raises(TaskFileError, match="holds no tasks"):
        read_task_file(_write(tmp_path, b"\n  \n"), SPEC.parse_task)
    with pytest.raises(TaskFileError, match="no such task file"):
        read_task_file(tmp_path / "absent.jsonl", SPEC.parse_task)


_garbage = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b.strip()),
    st.text(min_size=1, max_size=40).filter(lambda t: "\n" not in t and t.strip()).map(str.encode),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
        max_leaves=8,
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None)
@given(n_good=st.integers(0, 5), garbage=_garbage, n_after=st.integers(0, 3))
def test_any_line_that_is_not_a_task_is_reported_at_its_line(tmp_path_factory, n_good, garbage, n_after):
    lines = [GOOD.encode()] * n_good + [garbage] + [GOOD.encode()] * n_after
    path = tmp_path_factory.mktemp("prop") / "tasks.jsonl"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(TaskFileError) as info:
        read_task_file(path, SPEC.parse_task)
    assert f"{path}:{n_good + 1}:" in str(info.value)
