"""A trained policy directory, loaded for acting: ``state, instruction -> action``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kalm.files import read_json
from kalm.offline.encoder import CachedEncoder, shared_encoder
from kalm.offline.policy_files import ALGO_FILE, CONFIG_FILE, MODEL_FILE, create_algo, load_weights


class LanguagePolicy:
    """The greedy action of a trained learner on ``state ⊕ embedding(instruction)``."""

    def __init__(self, policy_dir: str | Path, embedding_cache: str | Path | None = None):
        self.policy_dir = Path(policy_dir)
        if not self.policy_dir.is_dir():
            raise FileNotFoundError(f"policy directory not found: {self.policy_dir}")
        self.config = read_json(self.policy_dir / CONFIG_FILE, "policy config")
        _check_policy_config(self.config, self.policy_dir / CONFIG_FILE)
        steps_asked = self.config["train"]["steps"]
        if not (self.policy_dir / MODEL_FILE).is_file() or self.config.get("completed_steps") != steps_asked:
            raise ValueError(
                f"{self.policy_dir} holds an unfinished run ({self.config.get('completed_steps')} of {steps_asked} "
                "steps); finish it with `kalm train ... --resume`"
            )
        self.env = str(self.config["env"])
        from kalm.envs import get_spec

        spec = get_spec(self.env)
        if (spec.state_dim, spec.action_dim) != (self.config["state_dim"], self.config["action_size"]):
            raise ValueError(
                f"{self.policy_dir / CONFIG_FILE}: the policy takes {self.config['state_dim']}-d states and "
                f"{self.config['action_size']} actions, env {self.env!r} has {spec.state_dim} and {spec.action_dim}"
            )
        self.algo = create_algo(self.policy_dir / ALGO_FILE)
        impl = self.algo.impl
        if impl is not None:
            shape = tuple(int(d) for d in impl.observation_shape)
            expected = (int(self.config["observation_dim"]),)
            if shape != expected or int(impl.action_size) != int(self.config["action_size"]):
                raise ValueError(
                    f"{self.policy_dir / ALGO_FILE}: network for observations {shape} and {impl.action_size} actions, "
                    f"but {CONFIG_FILE} says ({self.config['observation_dim']},) and {self.config['action_size']}"
                )
        load_weights(self.algo, self.policy_dir / MODEL_FILE)
        self.encoder: CachedEncoder = shared_encoder(self.config["encoder"], embedding_cache)
        expected = int(self.config["observation_dim"])
        if self.config["state_dim"] + self.encoder.dim != expected:
            raise ValueError(
                f"{self.policy_dir}: encoder {self.encoder.name!r} gives {self.encoder.dim}-d vectors but the policy "
                f"expects {expected - self.config['state_dim']}"
            )
        self.name = f"{self.config['train']['algo']}:{self.policy_dir.name}"

    def embed(self, instruction: str) -> np.ndarray:
        return self.encoder.encode([instruction])[0]

    def act(self, state: np.ndarray, embedding: np.ndarray):
        x = np.concatenate([np.asarray(state, dtype=np.float32), embedding])[None]
        action = self.algo.predict(x)[0]
        return int(action) if np.ndim(action) == 0 else np.asarray(action, dtype=np.float32)

    def act_batch(self, states: np.ndarray, embeddings: np.ndarray, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> np.ndarray:
        """Actions for a batch of states, each with its instruction's embedding: greedy
        at ``temperature`` 0, otherwise drawn from :meth:`action_probabilities`."""
        if temperature <= 0:
            return self.algo.predict(self._inputs(states, embeddings))
        probs = torch.from_numpy(self.action_probabilities(states, embeddings, temperature))
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1).numpy()

    def action_probabilities(self, states: np.ndarray, embeddings: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """``(n, n_actions)``: the policy's own action distribution, its logits divided by
        ``temperature``. Only learners that have one (d3rlpy's discrete BC keeps its
        categorical policy as the ``imitator`` module); others are refused by name."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
        imitator = getattr(getattr(self.algo.impl, "modules", None), "imitator", None)
        x = torch.from_numpy(self._inputs(states, embeddings)).to(self.algo.impl.device)
        scaler = self.algo.config.observation_scaler  # what d3rlpy's predict applies before the network
        with torch.no_grad():
            output = imitator(scaler.transform(x) if scaler else x) if imitator is not None else None
        if output is None or not hasattr(output, "logits"):
            raise ValueError(f"{self.name}: sampling actions needs a policy with a discrete action distribution "
                             "(discrete BC); this one only acts greedily")
        return torch.softmax(output.logits.float().cpu() / temperature, dim=-1).numpy().astype(np.float64)

    @staticmethod
    def _inputs(states: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(states, dtype=np.float32), np.asarray(embeddings, dtype=np.float32)], 1)


_REQUIRED = {"train": dict, "env": str, "encoder": str, "observation_dim": int, "state_dim": int, "action_size": int,
             "completed_steps": int}


def _check_policy_config(config, path: Path) -> None:
    """Refuse a policy config.json that lacks a field the policy needs, naming it."""
    if not isinstance(config, dict):
        raise ValueError(f"policy config {path}: expected a JSON object, got {type(config).__name__}")
    for name, kind in _REQUIRED.items():
        value = config.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"policy config {path}: field {name!r} is missing or not a {kind.__name__} ({value!r})")
    steps, algo = config["train"].get("steps"), config["train"].get("algo")
    if not isinstance(steps, int) or not isinstance(algo, str):
        raise ValueError(f"policy config {path}: field 'train' lacks its 'steps' or 'algo'")
