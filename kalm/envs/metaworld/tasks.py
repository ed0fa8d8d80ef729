"""Meta-World tasks as typed data: success predicates over the 39-d state, JSON in/out.

The state is the package's goal-observable observation (metaworld 3.x, ``*-v3``):

====== =============================================================
0:3    hand (end-effector body) xyz
3      gripper opening, 0 (closed) .. 1 (open)
4:7    object 1 position (puck, door handle, drawer handle, button top, peg, window handle)
7:11   object 1 quaternion (scipy order x, y, z, w; zeros where the package reports none)
11:18  object 2 (pos + quat; all zeros in the MT10 skills)
18:36  the same 18 numbers one step earlier
36:39  the goal position
====== =============================================================

Task kinds:

- ``skill(name)``: one of the ten MT10 skills, goal drawn by the package (training).
- ``relocated(skill, region)``: reach / push / pick-place with the goal placed in a
  region the package's sampler never uses (``left``, ``right``, ``near`` the robot);
  the package itself sets goals this way (``set_task`` freezes a chosen ``rand_vec``).
  Unseen-easy level.
- ``then_home(skill)``: do a skill, then bring the hand back to where it started (the
  ``reach`` skill aimed at the start position), in the same scene. Unseen-hard level.

Predicates are the package's success tests, rewritten over the state so they can judge
imagined states with no simulator behind them. Exact (same formula, same numbers as the
package computes from the same observation): push, pick-place, door-open, drawer-open,
drawer-close, button-press-topdown, window-open, window-close. Approximations:

- ``reach``: the package measures the fingertip centre (``tcp_center``), which is not in
  the state; it is taken as the hand position plus a fixed offset measured on expert
  rollouts (``TCP_OFFSET``; the true offset varies by up to 5 mm with the finger opening).
- ``peg-insert-side``: the package measures the peg *head*; the state holds the peg's
  grasp point and orientation, so the head is reconstructed by rotating the rigid
  offset ``PEG_HEAD_OFFSET`` (measured, constant to 1e-15) by the state's quaternion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kalm.envs.spec import Task, TaskSpecError, task_kind_fields

SKILLS: tuple[str, ...] = (
    "reach",
    "push",
    "pick-place",
    "door-open",
    "drawer-open",
    "drawer-close",
    "button-press-topdown",
    "peg-insert-side",
    "window-open",
    "window-close",
)
# Fingertip centre minus hand position, mean over expert reach / peg rollouts.
TCP_OFFSET = np.array([-0.0005, 0.0033, -0.0449])
# The peg head in the peg's own frame, relative to its grasp site (metaworld 3.1.1).
PEG_HEAD_OFFSET = np.array([-0.13, 0.0, -0.01])
PEG_SCALE = np.array([1.0, 2.0, 2.0])
HOME_RADIUS = 0.05  # the package's reach threshold, used for "back to the start"

# Goal regions of the relocated (unseen-easy) tasks: (goal low, goal high) in xyz. The
# package samples objects at x in [-0.1, 0.1], y in [0.6, 0.7] and goals at
# y in [0.8, 0.9] (beyond the object); these put the goal beside or in front of it,
# always at least 0.15 from the object, which the package's reset loop requires.
RELOCATABLE: tuple[str, ...] = ("reach", "push", "pick-place")
REGIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left": ((-0.32, 0.6), (-0.27, 0.7)),
    "right": ((0.27, 0.6), (0.32, 0.7)),
    "near": ((-0.1, 0.42), (0.1, 0.45)),
}
# then_home needs a skill whose result survives the hand leaving and a way home that
# does not undo it; measured with the expert (5 seeds each): push, drawer-close,
# window-open, window-close, peg-insert-side succeed 5/5. Left out: door-open and
# drawer-open (the opened door / drawer lies between the hand and home, and the way back
# shuts it: 0/5), button-press-topdown (the button springs back up when released: 3/5),
# pick-place (the goal is in the air, the released puck falls: 0/5), reach (the goal and
# home are both hand positions, so the pair contradicts itself).
HOMEABLE: tuple[str, ...] = ("push", "drawer-close", "window-open", "window-close", "peg-insert-side")


def hand(state: np.ndarray) -> np.ndarray:
    return np.asarray(state[0:3], dtype=np.float64)


def obj(state: np.ndarray) -> np.ndarray:
    return np.asarray(state[4:7], dtype=np.float64)


def goal(state: np.ndarray) -> np.ndarray:
    return np.asarray(state[36:39], dtype=np.float64)


def _quat_rotate(q_xyzw: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotate ``v`` by the unit quaternion ``q`` in scipy's (x, y, z, w) order."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-9:
        return np.asarray(v, dtype=np.float64)
    x, y, z, w = q / n
    u = np.array([x, y, z])
    return 2.0 * (u @ v) * u + (w * w - u @ u) * v + 2.0 * w * np.cross(u, v)


def skill_distance(name: str, state: np.ndarray) -> tuple[float, float]:
    """``(distance, threshold)`` of the package's success test for a skill, over a state."""
    s = np.asarray(state, dtype=np.float64)
    if name == "reach":
        return float(np.linalg.norm(hand(s) + TCP_OFFSET - goal(s))), 0.05
    if name == "push":
        return float(np.linalg.norm(obj(s) - goal(s))), 0.05
    if name == "pick-place":
        return float(np.linalg.norm(obj(s) - goal(s))), 0.07
    if name == "door-open":
        return float(abs(s[4] - s[36])), 0.08
    if name == "drawer-open":
        return float(np.linalg.norm(obj(s) - goal(s))), 0.03
    if name == "drawer-close":
        return float(np.linalg.norm(obj(s) - goal(s))), 0.065
    if name == "button-press-topdown":
        return float(abs(s[38] - s[6])), 0.024
    if name == "peg-insert-side":
        head = obj(s) + _quat_rotate(s[7:11], PEG_HEAD_OFFSET)
        return float(np.linalg.norm((head - goal(s)) * PEG_SCALE)), 0.07
    if name in ("window-open", "window-close"):
        return float(abs(s[4] - s[36])), 0.05
    raise ValueError(f"unknown skill {name!r}")


@dataclass(frozen=True)
class Skill:
    """An MT10 skill with the goal the package samples: the training tasks."""

    name: str
    kind: str = "skill"

    def success(self, state: np.ndarray, start: np.ndarray | None = None) -> bool:
        d, threshold = skill_distance(self.name, state)
        return bool(d <= threshold)

    def cost(self, state: np.ndarray, start: np.ndarray | None = None) -> float:
        d, threshold = skill_distance(self.name, state)
        return float(max(0.0, d - threshold))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name}


def in_region(region: str, point: np.ndarray, slack: float = 0.01) -> bool:
    low, high = (np.asarray(v) for v in REGIONS[region])
    return bool(np.all(point[:2] >= low - slack) and np.all(point[:2] <= high + slack))


@dataclass(frozen=True)
class Relocated:
    """A reach / push / pick-place skill whose goal lies in a region never trained on.

    Success is the skill's test, and the state's goal must lie in the region (so an
    imagined rollout cannot succeed by moving the goal instead of the object).
    """

    skill: str
    region: str
    kind: str = "relocated"

    def success(self, state: np.ndarray, start: np.ndarray | None = None) -> bool:
        return in_region(self.region, goal(state)) and Skill(self.skill).success(state)

    def cost(self, state: np.ndarray, start: np.ndarray | None = None) -> float:
        return Skill(self.skill).cost(state)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "skill": self.skill, "region": self.region}


@dataclass(frozen=True)
class ThenHome:
    """A skill, then the hand back within 5 cm of where it started (two skills in a row:
    the skill, then ``reach`` towards the start). Judged on the final state: the skill's
    result holds and the hand is home, which only the sequence achieves."""

    skill: str
    kind: str = "then_home"

    def _home_distance(self, state: np.ndarray, start: np.ndarray) -> float:
        return float(np.linalg.norm(hand(state) - hand(start)))

    def success(self, state: np.ndarray, start: np.ndarray) -> bool:
        return Skill(self.skill).success(state) and self._home_distance(state, start) <= HOME_RADIUS

    def cost(self, state: np.ndarray, start: np.ndarray) -> float:
        skill_cost = Skill(self.skill).cost(state)
        return skill_cost + max(0.0, self._home_distance(state, start) - HOME_RADIUS)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "skill": self.skill}


def skill_of(task: Task) -> str:
    """The MT10 skill (and so the package scene and scripted policy) a task uses."""
    if isinstance(task, Skill):
        return task.name
    if isinstance(task, (Relocated, ThenHome)):
        return task.skill
    raise TaskSpecError(f"not a Meta-World task: {task!r}")


_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "skill": {"name": SKILLS},
    "relocated": {"skill": RELOCATABLE, "region": tuple(REGIONS)},
    "then_home": {"skill": HOMEABLE},
}


def parse_task(spec: Mapping[str, Any], where: str = "task") -> Task:
    """Build a task from its JSON form; anything malformed is refused with a message
    naming the field (``task.region: unknown region 'up' (expected one of ...)``)."""
    kind, fields = task_kind_fields(spec, _FIELDS, where)
    values = {}
    for name, allowed in fields.items():
        if name not in spec:
            raise TaskSpecError(f"{where}: missing field '{name}'")
        value = spec[name]
        if not isinstance(value, str):
            raise TaskSpecError(f"{where}.{name}: expected a string, got {type(value).__name__}")
        if value not in allowed:
            raise TaskSpecError(f"{where}.{name}: unknown {name} {value!r} for kind '{kind}' "
                                f"(expected one of {', '.join(allowed)})")
        values[name] = value
    if kind == "skill":
        return Skill(**values)
    if kind == "relocated":
        return Relocated(**values)
    return ThenHome(**values)


def training_tasks() -> list[Skill]:
    return [Skill(name) for name in SKILLS]


def easy_tasks() -> list[Relocated]:
    return [Relocated(s, r) for s in RELOCATABLE for r in REGIONS]


def hard_tasks() -> list[ThenHome]:
    return [ThenHome(s) for s in HOMEABLE]


EXTRA_STEPS_HOME = 50  # the way back home takes at most ~40 steps at full speed


def task_horizon(task: Task, default: int) -> int:
    """Steps an episode may take: the skill horizon, plus the way home for then_home."""
    return default + EXTRA_STEPS_HOME if isinstance(task, ThenHome) else default
