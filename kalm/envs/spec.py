"""What every environment tells the rest of kalm.

Grounding, imagination, offline RL and evaluation never branch on an environment's
name: they read the :class:`EnvSpec`. A new environment joins by building one of these
in its own folder under ``kalm/envs`` (a ``make_spec()``) and registering it, with its
Gymnasium id, in ``kalm/envs/__init__.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np


class TaskSpecError(ValueError):
    """A task description (JSON or Python) is malformed; the message names the field."""


def task_kind_fields(spec: Any, fields_by_kind: Mapping[str, Mapping[str, Any]], where: str) -> tuple[str, Mapping]:
    """The checks every environment's task parser starts with: ``spec`` is an object
    with a known ``kind`` and no fields that kind does not have. Returns the kind and
    its field table; what each field may hold is the caller's to check."""
    if not isinstance(spec, Mapping):
        raise TaskSpecError(f"{where}: expected an object, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind is None:
        raise TaskSpecError(f"{where}: missing field 'kind'")
    if not isinstance(kind, str) or kind not in fields_by_kind:
        raise TaskSpecError(f"{where}.kind: unknown kind {kind!r} (expected one of {', '.join(fields_by_kind)})")
    fields = fields_by_kind[kind]
    extra = sorted(set(spec) - set(fields) - {"kind"})
    if extra:
        raise TaskSpecError(f"{where}: unexpected field '{extra[0]}' for kind '{kind}'")
    return kind, fields


@runtime_checkable
class Task(Protocol):
    """A goal as data: a success predicate over states, and a JSON form.

    ``start`` is the state the episode began in; predicates about motion (a push)
    need it, predicates about arrangements ignore it.
    """

    kind: str

    def success(self, state: np.ndarray, start: np.ndarray) -> bool: ...

    def cost(self, state: np.ndarray, start: np.ndarray) -> float:
        """A non-negative distance to success (0 when it holds); planners descend it."""
        ...

    def to_json(self) -> dict[str, Any]: ...


def goal_key(task: Task) -> str:
    """A string naming the task's goal: equal for two tasks exactly when they are one
    goal. A task kind that can name one predicate in several ways defines
    ``canonical()`` (an equivalent task in a normal form); other tasks are keyed as
    they are."""
    canonical = getattr(task, "canonical", None)
    return json.dumps((canonical() if callable(canonical) else task).to_json(), sort_keys=True)


def same_task(a: Task, b: Task) -> bool:
    """Whether two tasks are one goal (see :func:`goal_key`)."""
    return goal_key(a) == goal_key(b)


def subgoals(task: Task) -> tuple[Task, ...]:
    """The parts of a conjunction, in order: a task kind that means "all of these at
    once" holds them in a ``tasks`` tuple (CLEVR-Robot's ``all_of``). ``()`` for any
    other task. Imagination can compose a conjunction from one segment per part."""
    parts = getattr(task, "tasks", None)
    return tuple(parts) if parts else ()


@dataclass(frozen=True)
class Instruction:
    """One instruction of an evaluation level: the text and the task it means."""

    text: str
    task: Task


class Waypoints(Protocol):
    """A coarser time scale for the LLM: one waypoint every ``every`` steps.

    ``encode(observations, actions)`` turns an episode's ``(T+1, d)`` states and ``(T,
    ...)`` actions into waypoint states and actions; ``decode`` turns waypoint states
    and actions back into per-step ones (``every`` steps per waypoint step);
    ``settle(actions)`` appends what a replay of decoded actions runs after them;
    ``carried_state`` are the blocks copied from one waypoint to the next (as
    ``EnvSpec.carried_state`` for steps)."""

    every: int
    carried_state: tuple[tuple, ...]

    def encode(self, observations: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, observations: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def settle(self, actions: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EnvSpec:
    """Everything about one environment that code outside ``kalm/envs`` may use.

    Attributes:
        name: short name used on the command line (``clevr``).
        gym_id: the id registered with Gymnasium.
        state_dim: length of the observation vector.
        action_space: the Gymnasium action space (``Discrete`` or ``Box``).
        max_episode_steps: the episode horizon.
        state_low / state_high: where states can physically be (the workbench);
            imagined states outside are hallucinations.
        max_step_displacement: the farthest any state coordinate group (a ball, a
            gripper) moves in one step under the real physics, measured; imagined
            steps beyond it violate the dynamics.
        levels: the evaluation levels in order (``seen``, ``rephrase``, ``easy``,
            ``hard``), each a function from a seed to its instructions.
        training_instruction: ``(task, rng) -> str``, a training phrasing of a task.
        parse_task: ``dict -> Task`` (raises :class:`TaskSpecError`).
        parse_instruction: ``str -> Task | None``, reads a generated instruction back
            into a task (used to score rollout explanations).
        training_tasks: the tasks the real dataset covers.
        make_expert: ``env -> policy``; the policy maps ``(obs, task, start)`` to an
            action and plans with the environment's own physics.
        make_env: builds a Gymnasium environment (``render_mode`` etc. as kwargs).
        check_transition: ``(state, action, next_state) -> {check: failed}``, the
            physical-plausibility checks an imagined transition must pass (always
            including ``off_workbench``, ``too_far`` and ``non_finite``).
        rewards: named reward functions ``(task, state, next_state, start) -> float``
            used to label transitions (``sparse`` and ``shaped`` at least).
        task_horizon: ``(task) -> int``, the steps an episode of that task may take
            (the environment truncates there); ``None`` means ``max_episode_steps``.
        render_state: ``(state, size, caption) -> RGB uint8 image`` of a bare state,
            with no simulator behind it (imagined states are drawn with it).
        carried_state: ``(destination, source, length)`` blocks of the next state that
            are exact copies of the current state's (a stacked previous frame, a goal
            fixed for the episode). Imagination copies them instead of trusting the
            LLM's prediction, so an imagined state is consistent by construction. A
            fourth element ``True`` copies the block only while it is empty (all
            zeros): an object slot that some scenes leave empty.
        grounding_phrasings: optional ``task -> (training, validation)`` phrasings for
            grounding the LLM: the validation ones never appear in its training, so
            explanation accuracy is measured on unseen wordings. Raises ``ValueError``
            for tasks it has no phrasings for; ``None`` means grounding uses each
            episode's own instruction text.
        waypoints: optional coarser time scale for the LLM (see :class:`Waypoints`):
            grounding sees every episode encoded as waypoints, the LLM imagines and
            acts in them, and imagined rollouts are decoded back into per-step
            transitions before they are checked, labelled and stored. ``None``: the LLM
            works step by step.
        scene_goals: optional ``task -> training tasks`` a rollout in ``task``'s scene
            can achieve, the labels hindsight data draws from (:mod:`kalm.data.hindsight`).
            ``None``: every training task (one scene holds them all, as on CLEVR-Robot's
            table); Meta-World gives each skill its own scene.
    """

    name: str
    gym_id: str
    state_dim: int
    action_space: gym.spaces.Space
    max_episode_steps: int
    state_low: np.ndarray
    state_high: np.ndarray
    max_step_displacement: float
    levels: Mapping[str, Callable[[int], Sequence[Instruction]]]
    training_instruction: Callable[[Task, np.random.Generator], str]
    parse_task: Callable[[Mapping[str, Any]], Task]
    parse_instruction: Callable[[str], Task | None]
    training_tasks: Callable[[], Sequence[Task]]
    make_expert: Callable[[gym.Env], Callable[[np.ndarray, Task, np.ndarray], Any]]
    make_env: Callable[..., gym.Env]
    check_transition: Callable[[np.ndarray, Any, np.ndarray], dict[str, bool]]
    rewards: Mapping[str, Callable[[Task, np.ndarray, np.ndarray, np.ndarray], float]]
    grounding_phrasings: Callable[[Task], tuple[Sequence[str], Sequence[str]]] | None = None
    render_state: Callable[[np.ndarray, int, str | None], np.ndarray] | None = None
    task_horizon: Callable[[Task], int] | None = None
    carried_state: tuple[tuple, ...] = ()
    waypoints: Waypoints | None = None
    scene_goals: Callable[[Task], Sequence[Task]] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def horizon(self, task: Task) -> int:
        """Steps an episode of ``task`` may take."""
        return self.max_episode_steps if self.task_horizon is None else self.task_horizon(task)

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, gym.spaces.Discrete)

    @property
    def action_dim(self) -> int:
        """Number of discrete actions, or the length of a continuous action."""
        if self.discrete:
            return int(self.action_space.n)
        return int(np.prod(self.action_space.shape))
