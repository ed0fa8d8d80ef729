"""Saving and loading d3rlpy learners without pickle.

d3rlpy's own ``save``/``load_learnable`` (.d3) files are a ``pickle.dump`` of a dict
(d3rlpy/base.py), and loading one runs ``pickle.load``: a crafted policy file could
execute code. We therefore store the two halves separately:

- the algorithm's configuration as d3rlpy's own JSON serialisation
  (``LearnableConfigWithShape.serialize``), and
- the network and optimiser state dicts as written by d3rlpy's ``save_model``
  (``torch.save`` of plain state dicts), read back with ``torch.load(...,
  weights_only=True)``, which refuses anything but tensors and primitive containers.
"""

from __future__ import annotations

from pathlib import Path

import d3rlpy
import torch

from kalm.files import write_atomic, write_text_atomic

CPU = "cpu:0"

# What a policy directory written by :func:`kalm.offline.train.train` holds.
CONFIG_FILE = "config.json"  # TrainConfig, env, encoder, data files, steps done
ALGO_FILE = "algo.json"  # the d3rlpy algorithm config
MODEL_FILE = "model.pt"  # the final network state dicts
CURVE_FILE = "curve.csv"  # training losses per step
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"  # inside CHECKPOINT_DIR, written last


def save_algo_config(algo: d3rlpy.base.LearnableBase, path: str | Path) -> Path:
    impl = algo.impl
    if impl is None:
        raise ValueError("the learner has no networks yet (create_impl was not called)")
    shaped = d3rlpy.base.LearnableConfigWithShape(
        observation_shape=impl.observation_shape, action_size=impl.action_size, config=algo.config
    )
    return write_text_atomic(path, shaped.serialize())


def create_algo(config_path: str | Path) -> d3rlpy.base.LearnableBase:
    """A learner with freshly initialised networks, built from a stored JSON config."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"algorithm config not found: {path}")
    try:
        shaped = d3rlpy.base.LearnableConfigWithShape.deserialize(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - d3rlpy/dataclasses_json raise assorted errors
        raise ValueError(f"{path} is not a d3rlpy algorithm config: {exc}") from None
    try:
        return shaped.create(device=CPU)
    except Exception as exc:  # noqa: BLE001 - shapes or parameters d3rlpy cannot build networks from
        raise ValueError(f"{path}: cannot build the algorithm it describes ({type(exc).__name__}: {exc})") from None


def save_weights(algo: d3rlpy.base.LearnableBase, path: str | Path) -> Path:
    """Networks and optimiser state, atomically (a kill mid-write keeps the old file)."""
    impl = algo.impl
    if impl is None:
        raise ValueError("the learner has no networks yet (create_impl was not called)")
    return write_atomic(path, impl.save_model)


def load_weights(algo: d3rlpy.base.LearnableBase, path: str | Path) -> None:
    path = Path(path)
    impl = algo.impl
    if impl is None:
        raise ValueError("the learner has no networks yet (create_impl was not called)")
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise ValueError(f"{path} is not a weights-only model file: {exc}") from None
    if not isinstance(states, dict):
        raise ValueError(f"{path} is not a dict of module states (got {type(states).__name__})")
    modules = impl.modules.create_checkpointer(CPU).modules
    if set(modules) != set(states):
        # each d3rlpy learner has its own set of networks and optimisers
        raise ValueError(f"{path} holds the networks of another algorithm ({', '.join(sorted(states))}), "
                         f"not of {algo.config.get_type()} ({', '.join(sorted(modules))})")
    for name, module in modules.items():
        try:
            module.load_state_dict(states[name])
        except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as exc:
            # Size mismatches: weights of another environment (state or action size).
            first = str(exc).strip().splitlines()
            detail = "; ".join(line.strip() for line in first[1:3]) or (first[0] if first else "")
            raise ValueError(f"{path}: the state of {name!r} does not fit the network in algo.json "
                             f"(another environment or algorithm?): {detail}") from None
