"""Meta-World's skills behind one Gymnasium environment.

One :class:`MetaWorldEnv` holds one package environment per skill (built on first
use; each is its own MuJoCo scene, :mod:`~kalm.envs.metaworld.scenes`), and
``reset(options={"task": ...})`` picks the scene the task needs. Observations are the
package's 39-d goal-observable vector (see :mod:`kalm.envs.metaworld.tasks`), actions
its ``Box(-1, 1, (4,))`` (hand xyz delta and gripper effort), ``info["success"]`` its
own success flag (for ``then_home`` also the hand back home).

Choices:

- Horizon: 150 steps (200 for ``then_home`` and the compositions), not the package's
  500. The scripted experts need 40-125 steps (peg insertion the most; the
  compositions 70-176), KALM used 100, and every step is CPU time in collection and
  evaluation on a 2-core machine.
- Goals are observable (``_partially_observable = False``), as in KALM's
  ``*-goal-observable`` envs; the scripted policies read the goal from the observation.
- Resets are random and seeded: the package draws object and goal positions from the
  generator we seed from ``reset(seed=...)`` (``seeded_rand_vec``), so a seed gives the
  same start, whatever episodes came before. Relocated tasks freeze a ``rand_vec`` we
  draw, which is how the package's own ``set_task`` fixes goals.
- ``reset(options={"task": ..., "state": s})`` starts from a recorded start ``s`` (the
  replay of an imagined rollout): the package's reset vector is solved from ``s``.
- An episode ends (terminated) on success, like the other kalm environments.
- Without a task, ``reset`` picks a random training skill.
- Every scene's collision and joint settings are the package's; the two composed
  scenes change only what their module says.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"

import gymnasium as gym
import numpy as np

try:
    import metaworld  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Meta-World environment needs the 'metaworld' package: pip install 'kalm[metaworld]'"
    ) from exc

from kalm.envs.metaworld.render import render_schematic
from kalm.envs.metaworld.scenes import scene_class
from kalm.envs.metaworld.tasks import (
    REGIONS,
    RELOCATABLE,
    SKILLS,
    TRAINING_SKILLS,
    Relocated,
    Skill,
    ThenHome,
    parse_task,
    skill_of,
    task_horizon,
)
from kalm.envs.spec import Task, TaskSpecError

STATE_DIM = 39
ACTION_DIM = 4
SKILL_HORIZON = 150
MAX_EPISODE_STEPS = task_horizon(ThenHome("push"), SKILL_HORIZON)
_RESET_SOLVER_ITERATIONS = 4
_RESET_PROBE = 1e-3
_MAX_DRAWS = 8
_RESET_TOLERANCE = 1e-5
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")


def build_package_env(skill: str):
    """The environment of a skill's scene, goal-observable, with seeded random resets
    (what ``metaworld.env_dict._create_observable_goal_envs`` does, minus the frozen goal)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r} (expected one of {', '.join(SKILLS)})")
    env = scene_class(skill)()
    env._partially_observable = False
    if skill in RELOCATABLE:
        # The package clips observations to its goal space, so a goal outside the
        # trained box would be reported at the box's edge: widen the box to the regions.
        lows = [env.goal_space.low[:2]] + [np.asarray(low) for low, _ in REGIONS.values()]
        highs = [env.goal_space.high[:2]] + [np.asarray(high) for _, high in REGIONS.values()]
        low, high = env.goal_space.low.copy(), env.goal_space.high.copy()
        low[:2], high[:2] = np.min(lows, axis=0), np.max(highs, axis=0)
        env.goal_space = gym.spaces.Box(low, high, dtype=np.float64)
    del env.sawyer_observation_space  # cached property: recomputed with the goal bounds
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    env.seed(0)
    return env


class _NotAStart(Exception):
    """A frozen reset vector the scene's reset would reject (and redraw forever)."""


class MetaWorldEnv(gym.Env):
    """Skills, relocated goals and skill-then-home sequences (see the module docs)."""

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, render_mode: str | None = None, render_size: int = 256, camera: str = "corner"):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unsupported render_mode {render_mode!r}; use 'rgb_array' or None")
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r} (expected one of {', '.join(CAMERAS)})")
        self.render_mode = render_mode
        self.render_size = render_size
        self.camera = camera
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(STATE_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._sims: dict[str, Any] = {}
        self.sim: Any = None
        self.task: Task | None = None
        self.start_state = np.zeros(STATE_DIM, dtype=np.float32)
        self._steps = 0
        self._horizon = SKILL_HORIZON
        self._renderers: dict[int, Any] = {}
        self._gl_failed = False
        self._last_obs = np.zeros(STATE_DIM, dtype=np.float32)

    def scene(self, skill: str):
        """The package environment of a skill (built once, then reused)."""
        if skill not in self._sims:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._sims[skill] = build_package_env(skill)
        return self._sims[skill]

    # ----------------------------------------------------------------- gymnasium
    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        task = options.get("task")
        if isinstance(task, Mapping):
            task = parse_task(task)
        elif task is None:
            task = Skill(TRAINING_SKILLS[int(self.np_random.integers(len(TRAINING_SKILLS)))])
        elif not isinstance(task, (Skill, Relocated, ThenHome)):
            raise TaskSpecError(f"options['task'] must be a Meta-World task or its JSON form, got {task!r}")
        self.task = task
        self.sim = self.scene(skill_of(task))
        self.sim.seed(int(self.np_random.integers(2**31)))
        if options.get("state") is not None:
            obs = self._reset_to_state(np.asarray(options["state"], dtype=np.float64))
        else:
            if isinstance(task, Relocated):
                self._reset_relocated(task)
            else:
                self._reset_scene()
            obs = self._fresh_observation()
        self._steps = 0
        self._horizon = task_horizon(task, SKILL_HORIZON)
        self.start_state = np.asarray(obs, dtype=np.float32)
        self._last_obs = self.start_state.copy()
        return self.start_state.copy(), {"success": bool(task.success(self.start_state, self.start_state))}

    def _fresh_observation(self) -> np.ndarray:
        """The observation of the simulator as it now is.

        Some package resets move bodies (the window's slide joint, the drawer's
        cabinet) without recomputing positions, so the observation they return shows
        the object where it was before the reset and the first step "jumps" it by up to
        0.2. Recompute the kinematics and rebuild the observation (both frames equal,
        as the package stacks them at reset).
        """
        import mujoco

        sim = self.sim
        mujoco.mj_forward(sim.model, sim.data)
        current = sim._get_curr_obs_combined_no_goal()
        sim._prev_obs = current.copy()
        return np.hstack((current, current, sim._get_pos_goal()))

    def _reset_scene(self) -> None:
        """A random start of the scene: the package's draw, then a reset from the vector
        it drew (see :meth:`_reset_with`)."""
        self._package_reset()
        self._reset_with(self.sim._last_rand_vec)

    def _package_reset(self) -> None:
        """The package's reset, from MuJoCo's initial simulation state.

        The package settles the hand by simulating from wherever the previous episode
        left it; clearing the simulation state first keeps the episodes before out of
        the start."""
        import mujoco

        mujoco.mj_resetData(self.sim.model, self.sim.data)
        self.sim.reset()

    def _reset_with(self, vec: np.ndarray) -> np.ndarray:
        """Reset the scene from a chosen package ``rand_vec`` (what ``set_task`` does).

        The start is then a function of ``vec`` alone. A package reset runs
        ``reset_model`` twice and draws a vector in each; the hand settles during the
        second with the objects where the *first* draw put them, which matters where
        it touches them (door-lock's lock: up to 0.018). Drawing ``vec`` both times
        removes that, so a recorded start can be reproduced (replay).

        Raises :class:`_NotAStart` where the scene's reset would draw again and again:
        each ``reset_model`` draws once and redraws while its objects are too close
        (the goal on the puck, say), which a frozen vector would repeat forever."""
        sim, draws = self.sim, []

        def draw() -> np.ndarray:
            draws.append(1)
            if len(draws) > _MAX_DRAWS:
                raise _NotAStart
            sim._last_rand_vec = np.asarray(vec, dtype=np.float64).copy()
            return sim._last_rand_vec

        sim._get_state_rand_vec = draw
        try:
            self._package_reset()
        finally:
            del sim._get_state_rand_vec
        return self._fresh_observation()

    def _reset_to_state(self, state: np.ndarray) -> np.ndarray:
        """Reset to the start ``state`` (a replay of an imagined rollout starts where the
        imagination did): solve for the package's reset vector that reproduces it.

        A scene's start is a function of its ``rand_vec`` (object and goal positions
        drawn at reset), affine in the scenes here, so a finite-difference Jacobian and
        a least-squares step or two recover it from the state, starting from a random
        start of the scene. A state no reset produces comes back as the nearest start
        found; callers compare (:func:`kalm.evaluation.imagined.replay_actions` counts
        it as not replayable).
        """
        if state.shape != (STATE_DIM,) or not np.all(np.isfinite(state)):
            raise ValueError(f"options['state'] must be {STATE_DIM} finite numbers, got shape {state.shape}")
        space = self.sim._random_reset_space
        self._package_reset()
        vec = np.asarray(self.sim._last_rand_vec, dtype=np.float64).copy()
        best = self._reset_with(vec)
        for _ in range(_RESET_SOLVER_ITERATIONS):
            if np.allclose(best, state, atol=_RESET_TOLERANCE):
                break
            try:
                columns = []
                for unit in np.eye(len(vec)) * _RESET_PROBE:
                    try:
                        columns.append((self._reset_with(vec + unit) - best) / _RESET_PROBE)
                    except _NotAStart:
                        columns.append((best - self._reset_with(vec - unit)) / _RESET_PROBE)
                step, *_ = np.linalg.lstsq(np.stack(columns, axis=1), state - best, rcond=None)
                # A coordinate the package never varies (door-lock's door height)
                # stays where the package puts it.
                proposal = np.where(space.low == space.high, space.low, vec + step)
                candidate = self._reset_with(proposal)
            except _NotAStart:
                break
            if np.max(np.abs(candidate - state)) >= np.max(np.abs(best - state)):
                break
            vec, best = proposal, candidate
        return self._reset_with(vec)

    def _reset_relocated(self, task: Relocated) -> None:
        """Reset with the object where the package puts it and the goal in the task's region,
        by freezing the package's ``rand_vec`` (object xyz, goal xyz) as ``set_task`` does."""
        sim = self.sim
        space = sim._random_reset_space
        vec = sim.np_random.uniform(space.low, space.high)
        low, high = (np.asarray(v) for v in REGIONS[task.region])
        vec[3:5] = sim.np_random.uniform(low, high)
        self._reset_with(vec)

    def step(self, action):
        if self.sim is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be {ACTION_DIM} finite numbers, got {action!r}")
        obs, _, _, _, pkg_info = self.sim.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        state = np.asarray(obs, dtype=np.float32)
        self._last_obs = state
        success = bool(pkg_info["success"])
        if isinstance(self.task, ThenHome):
            success = success and bool(self.task.success(state, self.start_state))
        info = {"success": success, "package_success": bool(pkg_info["success"])}
        truncated = not success and self._steps >= self._horizon
        return state, (1.0 if success else 0.0), success, truncated, info

    # ----------------------------------------------------------------- rendering
    def render(self) -> np.ndarray | None:
        """An RGB frame of the current scene from ``camera`` (MuJoCo offscreen, EGL).

        Drawn with ``mujoco.Renderer`` on the package's model. The ``corner*`` cameras
        of the package's scene come out vertically flipped (so do the package's own
        ``rgb_array`` frames); they are flipped back here. Without an OpenGL platform
        (MuJoCo picks it when first imported: set ``MUJOCO_GL=egl`` before importing
        metaworld on a headless machine) the frame is the schematic of
        :func:`~kalm.envs.metaworld.render.render_schematic`, with a warning once.
        """
        if self.render_mode != "rgb_array" or self.sim is None:
            return None
        if self._gl_failed:
            return render_schematic(self._last_obs, self.render_size)
        import mujoco

        key = id(self.sim)
        try:
            if key not in self._renderers:
                self._renderers[key] = mujoco.Renderer(self.sim.model, self.render_size, self.render_size)
        except Exception as exc:  # noqa: BLE001 - no OpenGL platform in this process
            warnings.warn(f"MuJoCo offscreen rendering unavailable ({exc}); drawing schematic frames", stacklevel=2)
            self._gl_failed = True
            return render_schematic(self._last_obs, self.render_size)
        renderer = self._renderers[key]
        renderer.update_scene(self.sim.data, camera=self.camera)
        frame = renderer.render()
        return (frame[::-1] if self.camera.startswith("corner") else frame).copy()

    def close(self) -> None:
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
        for sim in self._sims.values():
            sim.close()
        self._sims = {}
        self.sim = None
