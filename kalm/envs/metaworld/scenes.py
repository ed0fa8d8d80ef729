"""Package scenes, including the two that hold a two-stage task.

Every single task is the package's own ``*-v3`` environment. KALM's two composed hard
tasks need one scene holding both stages, which the package does not ship; both are
built here from the package's own models, changed as little as the task needs:

- ``make-coffee``: coffee-push's scene already holds the coffee machine with its
  button (coffee-push and coffee-button load the same model). The observation gains
  the button in its second object slot (the package leaves that slot empty here), so
  a state says both where the mug is and whether the button is down.
- ``locked-door-open``: door-unlock's scene (the door with a lock) gets the hinge the
  package's door-open scene has (same axis, range, damping and armature), and the
  door's handle geom a name so it can be observed as door-open observes it. The lock
  holds the door shut while it is locked: the hinge's range is closed to zero until
  the lock has turned past :data:`UNLOCKED_ANGLE` (a latch; the package's lock is
  decorative, nothing else stops the door). Observation: the handle and the door's
  orientation in the first slot (as door-open reports them), the lock and its
  orientation in the second, door-open's goal in the goal slot.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np
from gymnasium.spaces import Box
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.envs.sawyer_coffee_push_v3 import SawyerCoffeePushEnvV3
from metaworld.envs.sawyer_door_unlock_v3 import SawyerDoorUnlockEnvV3
from scipy.spatial.transform import Rotation

from kalm.envs.metaworld.tasks import BUTTON_TOLERANCE, BUTTON_TRAVEL, DOOR_OPEN_TOLERANCE, UNLOCKED_ANGLE

# The success tests' constants live with the predicates (tasks.py), which read states
# with no simulator behind them; the scenes judge the simulator with the same numbers.
DOOR_RANGE = (-2.0, 0.0)  # door-open's hinge (doorlockB.xml)
DOOR_OPEN_OFFSET = np.array([-0.3, -0.45, 0.0])  # door-open-v3's goal, from the door body


class MakeCoffeeScene(SawyerCoffeePushEnvV3):
    """Push the mug under the machine, then press its button (see the module docs)."""

    def _get_pos_objects(self) -> np.ndarray:
        return np.hstack((self.get_body_com("obj"), self._get_site_pos("buttonStart")))

    def _get_quat_objects(self) -> np.ndarray:
        mug = Rotation.from_matrix(self.data.geom("mug").xmat.reshape(3, 3)).as_quat()
        return np.hstack((mug, [1.0, 0.0, 0.0, 0.0]))

    def button_target(self) -> np.ndarray:
        """Where the pressed button's tip is (coffee-button-v3's ``_target_pos``)."""
        return self.model.body("coffee_machine").pos + np.array([0.0, -0.22 + BUTTON_TRAVEL, 0.3])

    def evaluate_state(self, obs: np.ndarray, action: np.ndarray) -> tuple[float, dict[str, Any]]:
        reward, info = super().evaluate_state(obs, action)
        mug_in_place = bool(info["success"])
        pressed = abs(self.button_target()[1] - self._get_site_pos("buttonStart")[1]) <= BUTTON_TOLERANCE
        info["success"] = float(mug_in_place and pressed)
        return reward, info


class LockedDoorScene(SawyerDoorUnlockEnvV3):
    """Unlock the door, then open it (see the module docs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The package clips the observed goal to ``goal_space``: make it door-open's goals.
        space = self._random_reset_space
        self.goal_space = Box(space.low + DOOR_OPEN_OFFSET, space.high + DOOR_OPEN_OFFSET, dtype=np.float64)

    def _initialize_simulation(self) -> tuple[mujoco.MjModel, mujoco.MjData]:
        spec = mujoco.MjSpec.from_file(self.fullpath)
        door = spec.body("door_link")
        door.add_joint(name="doorjoint", type=mujoco.mjtJoint.mjJNT_HINGE, axis=[0, 0, 1], range=list(DOOR_RANGE),
                       limited=True, armature=0.001, damping=2.0)
        for geom in door.geoms:
            if geom.meshname == "door_handle":
                geom.name = "handle"
        model = spec.compile()
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        return model, mujoco.MjData(model)

    def _joint(self, name_or_body: str) -> int:
        if name_or_body == "lock":
            return int(self.model.body("lock_link").jntadr[0])
        return int(self.model.joint(name_or_body).id)

    def lock_angle(self) -> float:
        return float(self.data.qpos[self.model.jnt_qposadr[self._joint("lock")]])

    def _set_obj_xyz(self, pos: Any) -> None:
        """The lock at ``pos`` radians (what door-unlock's reset asks), the door shut."""
        qpos, qvel = self.data.qpos.flat.copy(), self.data.qvel.flat.copy()
        for joint, value in ((self._joint("lock"), float(pos)), (self._joint("doorjoint"), 0.0)):
            qpos[self.model.jnt_qposadr[joint]] = value
            qvel[self.model.jnt_dofadr[joint]] = 0.0
        self.set_state(qpos, qvel)

    def _latch(self) -> None:
        door = self._joint("doorjoint")
        self.model.jnt_range[door] = DOOR_RANGE if self.lock_angle() <= UNLOCKED_ANGLE else (0.0, 0.0)

    def reset_model(self) -> np.ndarray:
        super().reset_model()
        self._target_pos = self.model.body("door").pos + DOOR_OPEN_OFFSET
        self._latch()
        return self._get_obs()

    def step(self, action: np.ndarray):
        self._latch()
        return super().step(action)

    def _get_pos_objects(self) -> np.ndarray:
        return np.hstack((self.data.geom("handle").xpos, self._get_site_pos("lockStartUnlock")))

    def _get_quat_objects(self) -> np.ndarray:
        return np.hstack((self.data.body("door_link").xquat, self.data.body("lock_link").xquat))

    def evaluate_state(self, obs: np.ndarray, action: np.ndarray) -> tuple[float, dict[str, Any]]:
        reward, info = super().evaluate_state(obs, action)
        opened = abs(self.data.geom("handle").xpos[0] - self._target_pos[0]) <= DOOR_OPEN_TOLERANCE
        info["success"] = float(opened and self.lock_angle() <= UNLOCKED_ANGLE)
        return reward, info


COMPOSED_SCENES = {"make-coffee": MakeCoffeeScene, "locked-door-open": LockedDoorScene}


def scene_class(name: str):
    """The environment class of a task's scene: a composed one, or the package's."""
    return COMPOSED_SCENES.get(name) or ALL_V3_ENVIRONMENTS[f"{name}-v3"]
