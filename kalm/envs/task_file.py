"""Task files: JSON lines of ``{"instruction": "...", "task": {...}}``.

A task file lets anyone evaluate (or imagine for) instructions that are not in the
built-in levels. Such files are written by hand or by other tools, so every way a line
can be wrong is refused with its line number: bytes that are not UTF-8, invalid JSON,
``NaN``/``Infinity`` literals (not JSON, though Python's parser accepts them),
duplicate keys, nesting too deep to be a task, missing or extra fields, and tasks the
environment's parser rejects. Blank lines are skipped; a file with no tasks is an
error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kalm.envs.spec import Instruction, Task, TaskSpecError

MAX_DEPTH = 32
MAX_LINE_BYTES = 1 << 20
_FIELDS = ("instruction", "task")
# JSON's whitespace; str.strip() would also drop control characters such as \x1c.
_JSON_WHITESPACE = " \t\r"


class TaskFileError(ValueError):
    """A task file is unreadable or malformed; the message names the file and line."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting outside strings, measured without recursion so a
    line of a million ``[`` cannot exhaust the parser's stack."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_task_line(text: str, parse_task: Callable[[Mapping[str, Any]], Task]) -> Instruction:
    """One line's instruction and task (raises ``ValueError`` naming the problem)."""
    depth = _nesting_depth(text)
    if depth > MAX_DEPTH:
        raise ValueError(f"JSON nested {depth} levels deep (at most {MAX_DEPTH})")
    try:
        record = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with {' and '.join(_FIELDS)}, got {type(record).__name__}")
    for name in _FIELDS:
        if name not in record:
            raise ValueError(f"missing field {name!r}")
    extra = sorted(set(record) - set(_FIELDS))
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r} (expected only {', '.join(_FIELDS)})")
    instruction = record["instruction"]
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("field 'instruction' must be a non-empty string")
    try:
        task = parse_task(record["task"])
    except TaskSpecError as exc:
        raise ValueError(str(exc)) from None
    return Instruction(text=instruction, task=task)


def read_task_file(path: str | Path, parse_task: Callable[[Mapping[str, Any]], Task]) -> list[Instruction]:
    """Every instruction of a task file, in file order (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such task file") from None
    except IsADirectoryError:
        raise TaskFileError(f"{path}: is a directory, not a task file") from None
    instructions = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        if len(line) > MAX_LINE_BYTES:
            raise TaskFileError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TaskFileError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip(_JSON_WHITESPACE):
            continue
        try:
            instructions.append(parse_task_line(text, parse_task))
        except ValueError as exc:
            raise TaskFileError(f"{where}: {exc}") from None
    if not instructions:
        raise TaskFileError(f"{path}: the task file holds no tasks")
    return instructions


def write_task_line(instruction: Instruction) -> str:
    """The task-file line of an instruction (no trailing newline)."""
    return json.dumps({"instruction": instruction.text, "task": instruction.task.to_json()}, allow_nan=False)
