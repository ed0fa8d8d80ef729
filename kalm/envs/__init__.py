"""Environments, each reached through one :class:`~kalm.envs.spec.EnvSpec`.

Importing this package registers the Gymnasium ids (``kalm/CLEVRRobot-v0``,
``kalm/MetaWorld-v0``); Meta-World itself is imported only when its spec or env is made.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym

from kalm.envs.spec import EnvSpec, Instruction, Task, TaskSpecError

_SPEC_FACTORIES: dict[str, Callable[[], EnvSpec]] = {}
_SPECS: dict[str, EnvSpec] = {}


def _register_clevr() -> None:
    from kalm.envs import clevr

    if clevr.GYM_ID not in gym.registry:
        gym.register(
            id=clevr.GYM_ID,
            entry_point="kalm.envs.clevr.env:CLEVRRobotEnv",
            max_episode_steps=clevr.env.MAX_EPISODE_STEPS,
        )
    _SPEC_FACTORIES["clevr"] = clevr.make_spec


_register_clevr()

METAWORLD_GYM_ID = "kalm/MetaWorld-v0"


def _metaworld_spec() -> EnvSpec:
    """Imported only when asked for: Meta-World is the optional ``[metaworld]`` extra."""
    try:
        from kalm.envs import metaworld
    except ImportError as exc:
        raise ImportError(
            f"environment 'metaworld' needs the optional 'metaworld' package ({exc}); "
            "install it with: pip install 'kalm[metaworld]'"
        ) from exc
    return metaworld.make_spec()


def _register_metaworld() -> None:
    # The entry point is a string, so registering imports nothing; gym.make imports the
    # env module, which names the missing extra if metaworld is not installed.
    if METAWORLD_GYM_ID not in gym.registry:
        gym.register(id=METAWORLD_GYM_ID, entry_point="kalm.envs.metaworld.env:MetaWorldEnv")
    _SPEC_FACTORIES["metaworld"] = _metaworld_spec


_register_metaworld()


def get_spec(name: str) -> EnvSpec:
    """The spec of a named environment (``clevr``, ``metaworld``); unknown names are refused."""
    if name not in _SPEC_FACTORIES:
        raise ValueError(f"unknown environment {name!r} (available: {', '.join(sorted(_SPEC_FACTORIES))})")
    if name not in _SPECS:
        _SPECS[name] = _SPEC_FACTORIES[name]()
    return _SPECS[name]


def available() -> list[str]:
    return sorted(_SPEC_FACTORIES)


__all__ = ["EnvSpec", "Instruction", "Task", "TaskSpecError", "available", "get_spec"]
