"""CLEVR-Robot on the official ``mujoco`` bindings, with the Gymnasium API.

Five rubber balls on a table are moved by a point-mass pusher. One action is one push:
the pusher is teleported just behind a ball, opposite the push direction, and driven
by its motors along that direction for 40 physics substeps (0.4 s). Scene constants
follow the original environment used by KALM (kalm-reference §1) so that transitions
compare with the published data.

Two deliberate departures from the original, both documented in docs/clevr-robot.md:
- Reset samples ball centres only where the walls let them be (|x| <= 0.47,
  y in [-0.17, 0.5]); the original sampled y down to -0.3 and x to +-0.5, so most of
  its episodes began with a ball inside a wall that the first push shoved out.
- The push location is read from the simulator state at every step; the original read
  a cached scene graph that went stale when a state was set from outside.

As in the original, ball velocities carry over from one push to the next and are not
part of the observation (positions only), so the state is slightly partially observed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

# Without a display GLFW cannot open a context; EGL renders offscreen on most Linux
# machines (software or GPU). Set before mujoco is imported; a user's choice wins.
if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    os.environ["MUJOCO_GL"] = "egl"

import gymnasium as gym
import mujoco
import numpy as np

from kalm.envs.clevr.render import render_top_down
from kalm.envs.clevr.tasks import COLOURS, parse_task, start_admits, task_horizon
from kalm.envs.spec import Task, TaskSpecError

N_BALLS = len(COLOURS)
STATE_DIM = 2 * N_BALLS
PUSH_DIRECTIONS = np.array(
    [(1, 0), (0, 1), (-1, 0), (0, -1), (0.8, 0.8), (-0.8, 0.8), (0.8, -0.8), (-0.8, -0.8)], dtype=np.float64
)
N_ACTIONS = N_BALLS * len(PUSH_DIRECTIONS)
PUSH_OFFSET = 0.15
PUSH_SUBSTEPS = 40
MAX_EPISODE_STEPS = 50
TABLE_Z = -0.325
BALL_RADIUS = 0.13
PUSHER_Z = -0.2
RESET_LOW = np.array([-0.47, -0.17])
RESET_HIGH = np.array([0.47, 0.5])
MIN_RESET_SEPARATION = 0.36
# Where ball centres can physically be: the walls stop them here.
WORKBENCH_LOW = np.array([-0.475, -0.175])
WORKBENCH_HIGH = np.array([0.475, 0.575])
BALL_RGBA = {
    "red": (1.0, 0.1, 0.1, 1.0),
    "blue": (0.2, 0.5, 1.0, 1.0),
    "green": (0.2, 1.0, 0.0, 1.0),
    "purple": (0.8, 0.2, 1.0, 1.0),
    "cyan": (0.2, 1.0, 1.0, 1.0),
}


def decode_action(action: int) -> tuple[int, np.ndarray]:
    """``a = 8 * ball + direction`` -> (ball index, 2-D push direction)."""
    ball_index, direction = divmod(int(action), len(PUSH_DIRECTIONS))
    return ball_index, PUSH_DIRECTIONS[direction]


def _scene_xml() -> str:
    balls = "\n".join(
        f"""    <body name="ball_{c}" pos="0 0 {TABLE_Z + BALL_RADIUS}">
      <joint name="ball_{c}" type="free" damping="0.75" armature="0.04"/>
      <geom type="sphere" size="{BALL_RADIUS}" density="1" rgba="{' '.join(map(str, BALL_RGBA[c]))}"/>
    </body>"""
        for c in COLOURS
    )
    return f"""<mujoco model="clevr_robot">
  <option timestep="0.01" gravity="0 0 -9.81" integrator="Euler" iterations="20"/>
  <default>
    <joint armature="0.04" damping="1"/>
    <geom friction="0.8 0.1 0.1" density="300" margin="0.002" condim="3" contype="1" conaffinity="1"/>
  </default>
  <visual><global offwidth="640" offheight="640"/></visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.82 0.82 0.8" rgb2="0.76 0.76 0.74"
             width="256" height="256"/>
    <material name="table" texture="grid" texrepeat="4 4"/>
  </asset>
  <worldbody>
    <light pos="0 0.2 3" dir="0 0 -1" diffuse="0.9 0.9 0.9"/>
    <camera name="top" pos="0 0.2 2.2" xyaxes="1 0 0 0 1 0" fovy="35"/>
    <geom name="table" type="plane" pos="0 0.5 {TABLE_Z}" size="1 1 0.1" material="table"/>
    <geom name="wall_left" type="plane" pos="-0.6 0 0" zaxis="1 0 0" size="2 2 0.1" conaffinity="0" rgba="0 0 0 0"/>
    <geom name="wall_right" type="plane" pos="0.6 0 0" zaxis="-1 0 0" size="2 2 0.1" conaffinity="0" rgba="0 0 0 0"/>
    <geom name="wall_front" type="plane" pos="0 -0.3 0" zaxis="0 1 0" size="2 2 0.1" conaffinity="0" rgba="0 0 0 0"/>
    <geom name="wall_back" type="plane" pos="0 0.7 0" zaxis="0 -1 0" size="2 2 0.1" conaffinity="0" rgba="0 0 0 0"/>
{balls}
    <body name="pusher" pos="0 0 {PUSHER_Z}">
      <joint name="pusher_x" type="slide" axis="1 0 0" damping="0.5" limited="true" range="-10.3 10.3"/>
      <joint name="pusher_y" type="slide" axis="0 1 0" damping="0.5" limited="true" range="-10.3 10.3"/>
      <geom type="sphere" size="0.05" density="0.5" conaffinity="0" rgba="0.3 0.3 0.3 1"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="pusher_x" ctrllimited="true" ctrlrange="-2 2" gear="1"/>
    <motor joint="pusher_y" ctrllimited="true" ctrlrange="-2 2" gear="1"/>
  </actuator>
</mujoco>"""


class CLEVRRobotEnv(gym.Env):
    """Push five balls into arrangements described by a :class:`~kalm.envs.clevr.tasks.Task`.

    ``reset(seed=..., options={"task": task_or_json, "state": ten_vector})`` sets the
    goal (optional) and the start (optional, otherwise sampled among the starts from
    which the task is achievable). Push tasks end after one push (truncated unless it
    succeeded), as the reference judged them; other episodes last 50 pushes. Reward is 1 on the
    step where the task first holds, which also terminates the episode; ``info``
    carries ``success``. Without a task the reward is always 0.
    """

    metadata: ClassVar[dict] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, render_size: int = 256, renderer: str = "auto"):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unsupported render_mode {render_mode!r}; use 'rgb_array' or None")
        self.render_mode = render_mode
        self.render_size = render_size
        self.renderer = renderer
        self.model = mujoco.MjModel.from_xml_string(_scene_xml())
        self.data = mujoco.MjData(self.model)
        self._ball_qpos = np.array(
            [self.model.jnt_qposadr[self.model.joint(f"ball_{c}").id] for c in COLOURS], dtype=np.int64
        )
        self._ball_qvel = np.array(
            [self.model.jnt_dofadr[self.model.joint(f"ball_{c}").id] for c in COLOURS], dtype=np.int64
        )
        self._pusher_qpos = np.array(
            [self.model.jnt_qposadr[self.model.joint(n).id] for n in ("pusher_x", "pusher_y")], dtype=np.int64
        )
        self._pusher_qvel = np.array(
            [self.model.jnt_dofadr[self.model.joint(n).id] for n in ("pusher_x", "pusher_y")], dtype=np.int64
        )
        self._xy_index = (self._ball_qpos[:, None] + np.arange(2)[None, :]).ravel()
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(STATE_DIM,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self.task: Task | None = None
        self._pushes = 0
        self.start_state = np.zeros(STATE_DIM, dtype=np.float32)
        self._mj_renderer: Any = None

    # ----------------------------------------------------------------- state access
    def get_state(self) -> np.ndarray:
        """Ball centres ``[x_red, y_red, ..., x_cyan, y_cyan]`` as float32."""
        return self.data.qpos[self._xy_index].astype(np.float32)

    def set_state(self, state: np.ndarray) -> None:
        """Place the balls, still, at the given centres (the pusher goes back home).

        Balls are placed where the original's scene file puts them, touching the table
        at its surface (z = -0.195); under the 0.002 contact margin they would settle
        0.002 higher. Starting from the original's height replays the original's public
        from-rest pushes at median 0.0057 against 0.0136 from the settled height
        (docs/clevr-robot.md)."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (STATE_DIM,) or not np.all(np.isfinite(state)):
            raise ValueError(f"state must be {STATE_DIM} finite numbers, got shape {state.shape}")
        mujoco.mj_resetData(self.model, self.data)
        for i, adr in enumerate(self._ball_qpos):
            self.data.qpos[adr : adr + 3] = (state[2 * i], state[2 * i + 1], TABLE_Z + BALL_RADIUS)
            self.data.qpos[adr + 3 : adr + 7] = (1, 0, 0, 0)
        mujoco.mj_forward(self.model, self.data)

    def sample_start(self, rng: np.random.Generator) -> np.ndarray:
        """Ball centres uniform over the reachable table, at least 0.36 apart.

        Rejection sampling needs ~90 candidates per start, so the distance test runs on
        Python floats: with ``np.linalg.norm`` per pair it was 90 % of a reset (840
        resets/s on one core)."""
        min_square = MIN_RESET_SEPARATION**2
        (low_x, low_y), (span_x, span_y) = RESET_LOW.tolist(), (RESET_HIGH - RESET_LOW).tolist()
        while True:
            centres: list[tuple[float, float]] = []
            for _ in range(N_BALLS):
                for _ in range(10):
                    u, v = rng.random(2).tolist()
                    x, y = low_x + span_x * u, low_y + span_y * v
                    if all((x - cx) ** 2 + (y - cy) ** 2 >= min_square for cx, cy in centres):
                        centres.append((x, y))
                        break
                else:
                    break
            if len(centres) == N_BALLS:
                return np.asarray(centres, dtype=np.float64).ravel().astype(np.float32)

    # ----------------------------------------------------------------- gymnasium
    def reset(self, *, seed: int | None = None, options: Mapping[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        task = options.get("task")
        if isinstance(task, Mapping):
            task = parse_task(task)
        elif task is not None and not isinstance(task, Task):
            raise TaskSpecError(f"options['task'] must be a Task or its JSON form, got {type(task).__name__}")
        self.task = task
        start = options.get("state")
        if start is None:
            start = self.sample_start(self.np_random)
            while task is not None and not start_admits(task, start):
                start = self.sample_start(self.np_random)
        self.set_state(np.asarray(start))
        self.start_state = self.get_state()
        self._pushes = 0
        return self.start_state.copy(), self._info()

    def push(self, action: int) -> None:
        """Run one push in the simulator without any episode bookkeeping (planners use it)."""
        ball_index, direction = decode_action(action)
        centre = self.data.qpos[self._ball_qpos[ball_index] : self._ball_qpos[ball_index] + 2]
        self.data.qpos[self._pusher_qpos] = centre - PUSH_OFFSET * direction
        self.data.qvel[self._pusher_qvel] = 0.0
        self.data.ctrl[:] = direction
        mujoco.mj_step(self.model, self.data, nstep=PUSH_SUBSTEPS)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is outside Discrete({N_ACTIONS})")
        self.push(int(action))
        self._pushes += 1
        state = self.get_state()
        info = self._info(state)
        reward = 1.0 if info["success"] else 0.0
        horizon = task_horizon(self.task, MAX_EPISODE_STEPS) if self.task is not None else MAX_EPISODE_STEPS
        truncated = not info["success"] and self._pushes >= horizon < MAX_EPISODE_STEPS
        return state, reward, info["success"], truncated, info

    def _info(self, state: np.ndarray | None = None) -> dict[str, Any]:
        state = self.get_state() if state is None else state
        success = bool(self.task is not None and self.task.success(state, self.start_state))
        return {"success": success}

    def snapshot(self) -> np.ndarray:
        """The full integration state (positions, velocities, warm start), for look-ahead
        planning: restoring it makes the next push reproduce exactly."""
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        out = np.empty(mujoco.mj_stateSize(self.model, spec))
        mujoco.mj_getState(self.model, self.data, out, spec)
        return out

    def restore(self, snapshot: np.ndarray) -> None:
        mujoco.mj_setState(self.model, self.data, snapshot, mujoco.mjtState.mjSTATE_INTEGRATION)

    # ----------------------------------------------------------------- rendering
    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        if self.renderer in ("auto", "mujoco") and self._mj_renderer is not False:
            try:
                if self._mj_renderer is None:
                    self._mj_renderer = mujoco.Renderer(self.model, self.render_size, self.render_size)
                self._mj_renderer.update_scene(self.data, camera="top")
                return self._mj_renderer.render().copy()
            except Exception:  # no OpenGL on this machine: fall back to drawing
                if self.renderer == "mujoco":
                    raise
                self._mj_renderer = False
        return render_top_down(self.get_state(), size=self.render_size)

    def close(self) -> None:
        if self._mj_renderer not in (None, False):
            self._mj_renderer.close()
        self._mj_renderer = None
