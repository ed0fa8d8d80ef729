"""CLEVR-Robot tasks as typed data: success predicates over ball positions, JSON in/out.

A state is the 10-vector of ball centres ``[x_red, y_red, x_blue, y_blue, ...]`` in the
fixed colour order. Directions follow the original environment seen from the camera:
``behind`` is +y, ``front`` is -y, ``left`` is -x, ``right`` is +x.

Thresholds are those of the original KALM judges (kalm-reference §2): a relation holds
when the object lies in the anchor's 90-degree sector for the direction and within
0.39 (three ball radii) of it; a circle holds when every ball is within 0.325 of the
centre ball; a line holds when each consecutive pair is within 30 degrees of +x.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm.envs.spec import Task, TaskSpecError, task_kind_fields

COLOURS: tuple[str, ...] = ("red", "blue", "green", "purple", "cyan")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "behind": (0.0, 1.0),
    "left": (-1.0, 0.0),
    "front": (0.0, -1.0),
    "right": (1.0, 0.0),
}
OPPOSITE: dict[str, str] = {"behind": "front", "front": "behind", "left": "right", "right": "left"}
BALL_RADIUS = 0.13
RELATION_DISTANCE = 3 * BALL_RADIUS  # 0.39
CIRCLE_RADIUS = 2.5 * BALL_RADIUS  # 0.325
LINE_MAX_ANGLE_DEG = 30.0
PUSH_MIN_DISTANCE = 0.15
# Where a planner aims inside the relation region: between touching (0.26) and 0.39.
_RELATION_AIM = 0.32
# Ball centres can reach this box and no further (walls at x=+-0.6, y=-0.3 / +0.7).
REACHABLE_LOW = np.array([-0.47, -0.17])
REACHABLE_HIGH = np.array([0.47, 0.57])
MAX_NESTING = 4


def ball(state: np.ndarray, colour: str) -> np.ndarray:
    """The (x, y) centre of the ball of that colour in a 10-vector state."""
    i = COLOURS.index(colour)
    return np.asarray(state[2 * i : 2 * i + 2], dtype=np.float64)


def _sector_angle(direction: str) -> float:
    dx, dy = DIRECTIONS[direction]
    return math.degrees(math.atan2(dy, dx))


def in_sector(offset: np.ndarray, direction: str, half_width_deg: float = 45.0) -> bool:
    """Whether ``offset`` points into the direction's sector (angle within +-half width).

    Components below 1e-3 are zeroed first, as the original judge does, so a ball
    exactly on a sector border is classified stably.
    """
    x, y = (0.0 if abs(v) < 1e-3 else float(v) for v in offset)
    if x == 0.0 and y == 0.0:
        return False
    diff = (math.degrees(math.atan2(y, x)) - _sector_angle(direction) + 180.0) % 360.0 - 180.0
    return -half_width_deg <= diff < half_width_deg


@dataclass(frozen=True)
class Relation:
    """The object ball lies ``direction`` of the anchor ball, near it."""

    object: str
    anchor: str
    direction: str
    kind: str = "relation"

    def success(self, state: np.ndarray, start: np.ndarray | None = None) -> bool:
        offset = ball(state, self.object) - ball(state, self.anchor)
        return bool(np.linalg.norm(offset) < RELATION_DISTANCE and in_sector(offset, self.direction))

    def aim_point(self, state: np.ndarray) -> tuple[np.ndarray, float]:
        """Where the object should go, clipped to the reachable box, and how far the
        unclipped point lies outside it (the anchor itself must move first)."""
        target = ball(state, self.anchor) + _RELATION_AIM * np.asarray(DIRECTIONS[self.direction])
        clipped = np.clip(target, REACHABLE_LOW, REACHABLE_HIGH)
        return clipped, float(np.linalg.norm(target - clipped))

    def cost(self, state: np.ndarray, start: np.ndarray | None = None) -> float:
        if self.success(state):
            return 0.0
        target, outside = self.aim_point(state)
        return float(np.linalg.norm(ball(state, self.object) - target)) + 2.0 * outside

    def canonical(self) -> Relation:
        """This goal named from the ball that comes first in :data:`COLOURS`. The
        sectors are symmetric, so "red left of blue" and "blue right of red" are one
        predicate: describing a trajectory by either is the same description."""
        if COLOURS.index(self.object) < COLOURS.index(self.anchor):
            return self
        return Relation(self.anchor, self.object, OPPOSITE[self.direction])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "object": self.object, "anchor": self.anchor, "direction": self.direction}


@dataclass(frozen=True)
class Push:
    """The object ball moved at least 0.15 from where it started, along the direction."""

    object: str
    direction: str
    kind: str = "push"

    def _motion(self, state: np.ndarray, start: np.ndarray) -> tuple[float, float]:
        disp = ball(state, self.object) - ball(start, self.object)
        u = np.asarray(DIRECTIONS[self.direction])
        along = float(disp @ u)
        across = float(abs(disp[0] * u[1] - disp[1] * u[0]))
        return along, across

    def success(self, state: np.ndarray, start: np.ndarray) -> bool:
        along, across = self._motion(state, start)
        return along >= PUSH_MIN_DISTANCE and across <= along  # within +-45 degrees

    def cost(self, state: np.ndarray, start: np.ndarray) -> float:
        if self.success(state, start):
            return 0.0
        along, across = self._motion(state, start)
        return max(0.0, PUSH_MIN_DISTANCE - along) + max(0.0, across - along)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "object": self.object, "direction": self.direction}


@dataclass(frozen=True)
class AllOf:
    """Several tasks hold at the same time."""

    tasks: tuple[Task, ...]
    kind: str = "all_of"

    def success(self, state: np.ndarray, start: np.ndarray | None = None) -> bool:
        return all(t.success(state, start) for t in self.tasks)

    def cost(self, state: np.ndarray, start: np.ndarray | None = None) -> float:
        return float(sum(t.cost(state, start) for t in self.tasks))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "tasks": [t.to_json() for t in self.tasks]}


@dataclass(frozen=True)
class Line:
    """The balls lie left to right in colour order, each step within 30 degrees of +x."""

    kind: str = "line"

    def _cosines(self, state: np.ndarray) -> np.ndarray:
        centres = np.asarray(state, dtype=np.float64).reshape(len(COLOURS), 2)
        steps = np.diff(centres, axis=0)
        norms = np.maximum(np.linalg.norm(steps, axis=1), 1e-9)
        return steps[:, 0] / norms

    def success(self, state: np.ndarray, start: np.ndarray | None = None) -> bool:
        return bool(np.all(self._cosines(state) >= math.cos(math.radians(LINE_MAX_ANGLE_DEG))))

    def cost(self, state: np.ndarray, start: np.ndarray | None = None) -> float:
        if self.success(state):
            return 0.0
        shortfall = math.cos(math.radians(LINE_MAX_ANGLE_DEG)) - self._cosines(state)
        return float(np.clip(shortfall, 0.0, None).sum())

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class Circle:
    """Every other ball is within 0.325 of the centre ball."""

    center: str
    kind: str = "circle"

    def _distances(self, state: np.ndarray) -> np.ndarray:
        c = ball(state, self.center)
        return np.array([np.linalg.norm(ball(state, col) - c) for col in COLOURS if col != self.center])

    def success(self, state: np.ndarray, start: np.ndarray | None = None) -> bool:
        return bool(np.all(self._distances(state) < CIRCLE_RADIUS))

    def cost(self, state: np.ndarray, start: np.ndarray | None = None) -> float:
        if self.success(state):
            return 0.0
        return float(np.clip(self._distances(state) - (CIRCLE_RADIUS - 0.03), 0.0, None).sum())

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "center": self.center}


_FIELDS: dict[str, dict[str, str]] = {
    "relation": {"object": "colour", "anchor": "colour", "direction": "direction"},
    "push": {"object": "colour", "direction": "direction"},
    "all_of": {"tasks": "list"},
    "line": {},
    "circle": {"center": "colour"},
}


def _field(spec: Mapping[str, Any], name: str, expected: str, where: str) -> Any:
    if name not in spec:
        raise TaskSpecError(f"{where}: missing field '{name}'")
    value = spec[name]
    if expected == "list":
        if not isinstance(value, list):
            raise TaskSpecError(f"{where}.{name}: expected a list of tasks, got {type(value).__name__}")
        return value
    if not isinstance(value, str):
        raise TaskSpecError(f"{where}.{name}: expected a string, got {type(value).__name__}")
    allowed = COLOURS if expected == "colour" else tuple(DIRECTIONS)
    if value not in allowed:
        raise TaskSpecError(f"{where}.{name}: unknown {expected} {value!r} (expected one of {', '.join(allowed)})")
    return value


def parse_task(spec: Mapping[str, Any], where: str = "task", depth: int = 0) -> Task:
    """Build a task from its JSON form, refusing anything malformed with a message that
    names the offending field (``task.tasks[1].object: unknown colour 'pink' ...``)."""
    if depth > MAX_NESTING:
        raise TaskSpecError(f"{where}: tasks nested deeper than {MAX_NESTING} levels")
    kind, fields = task_kind_fields(spec, _FIELDS, where)
    values = {name: _field(spec, name, expected, where) for name, expected in fields.items()}
    if kind == "relation":
        if values["object"] == values["anchor"]:
            raise TaskSpecError(f"{where}.anchor: the object and the anchor are the same ball ({values['object']})")
        return Relation(**values)
    if kind == "push":
        return Push(**values)
    if kind == "circle":
        return Circle(**values)
    if kind == "line":
        return Line()
    subtasks = values["tasks"]
    if not subtasks:
        raise TaskSpecError(f"{where}.tasks: an all_of needs at least one task")
    return AllOf(tuple(parse_task(s, f"{where}.tasks[{i}]", depth + 1) for i, s in enumerate(subtasks)))


# The reference judged its easy level on a single push (an easy episode ended after
# one step). Without this, 50 random pushes move the right ball the right way in 73 %
# of push episodes, and the level would measure luck rather than understanding.
PUSH_HORIZON = 1


def task_horizon(task: Task, default: int) -> int:
    """How many pushes an episode of this task may take."""
    return PUSH_HORIZON if isinstance(task, Push) else default


def start_admits(task: Task, start: np.ndarray) -> bool:
    """Whether the task can be achieved from this start at all.

    A push needs room: a ball resting within a push of the wall it would be pushed
    into cannot travel 0.15 that way. Arrangements can always be reached, since any
    ball can be moved first. Resets with a task sample starts until this holds, so
    success rates measure the policy, not the luck of the start.
    """
    if isinstance(task, Push):
        centre = ball(start, task.object)
        u = np.asarray(DIRECTIONS[task.direction])
        room = np.where(u > 0, REACHABLE_HIGH - centre, np.where(u < 0, centre - REACHABLE_LOW, np.inf))
        return bool(np.min(room) >= PUSH_MIN_DISTANCE + 0.05)
    if isinstance(task, AllOf):
        return all(start_admits(t, start) for t in task.tasks)
    return True


def relation_goals() -> list[Relation]:
    """The 80 relation goals of the offline data: 20 ordered colour pairs x 4 directions."""
    return [
        Relation(obj, anchor, direction)
        for obj in COLOURS
        for anchor in COLOURS
        if obj != anchor
        for direction in DIRECTIONS
    ]


def push_tasks() -> list[Push]:
    """The 20 single-push tasks of the unseen-easy level."""
    return [Push(obj, direction) for obj in COLOURS for direction in DIRECTIONS]


def hard_tasks() -> list[Task]:
    """The unseen-hard tasks: compositions of relations, a line, and circles.

    The ``all_of`` compositions are chosen so that they can all hold at once: two
    relations over four distinct balls, or three where two objects flank one anchor
    from different sides and a third pair is disjoint.
    """
    directions = list(DIRECTIONS)
    opposite = {"behind": "front", "front": "behind", "left": "right", "right": "left"}
    tasks: list[Task] = []
    n = len(COLOURS)
    for i in range(n):
        a, b, c, d, e = (COLOURS[(i + k) % n] for k in range(n))
        for j, d1 in enumerate(directions):
            d2 = directions[(j + 1) % 4]
            tasks.append(AllOf((Relation(a, b, d1), Relation(c, d, d2))))
        for d1 in ("left", "behind"):
            tasks.append(
                AllOf((Relation(a, b, d1), Relation(e, b, opposite[d1]), Relation(c, d, directions[i % 4])))
            )
    tasks.append(Line())
    tasks.extend(Circle(c) for c in COLOURS)
    return tasks
