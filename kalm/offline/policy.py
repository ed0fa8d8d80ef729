"""A trained policy directory, loaded for acting: ``state, instruction -> action``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kalm.files import read_json
from kalm.offline.algos import SEQUENCE_ALGOS, d3rlpy_type
from kalm.offline.config import has_action_distribution
from kalm.offline.encoder import CachedEncoder, shared_encoder
from kalm.offline.policy_files import ALGO_FILE, CONFIG_FILE, MODEL_FILE, create_algo, load_weights

ActFn = Callable[[np.ndarray], Any]


class LanguagePolicy:
    """A trained learner acting on ``state ⊕ embedding(instruction)``: per state
    (:meth:`act`, :meth:`act_batch`) or, for a sequence model that needs its episode's
    history, through :meth:`episode_actor`, which serves every algorithm."""

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
        self.algo_name = str(self.config["train"]["algo"])
        self.discrete = spec.discrete
        self.algo = create_algo(self.policy_dir / ALGO_FILE)
        expected_type = d3rlpy_type(self.algo_name, spec.discrete)
        if self.algo.config.get_type() != expected_type:
            raise ValueError(f"{self.policy_dir / ALGO_FILE} holds a {self.algo.config.get_type()} learner, but "
                             f"{CONFIG_FILE} says {self.algo_name} ({expected_type}): the files of two runs are mixed")
        self._spec = spec
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
        self.name = f"{self.algo_name}:{self.policy_dir.name}"

    @property
    def is_sequence_model(self) -> bool:
        return self.algo_name in SEQUENCE_ALGOS

    @property
    def samples(self) -> bool:
        """Whether it has an action distribution to sample from (``temperature`` > 0)."""
        return has_action_distribution(self.algo_name, self.discrete)

    def embed(self, instruction: str) -> np.ndarray:
        return self.encoder.encode([instruction])[0]

    def episode_actor(self, embedding: np.ndarray, task: Any, start: np.ndarray, temperature: float = 0.0,
                      rng: np.random.Generator | None = None) -> ActFn:
        """The function from each observation of one episode (from ``start``, for
        ``task``) to its action: greedy at ``temperature`` 0, otherwise drawn from the
        policy's action distribution with ``rng``."""
        if temperature > 0 and not self.samples:
            raise ValueError(f"{self.name}: sampling actions needs a policy with a discrete action distribution "
                             "(discrete BC or Decision Transformer); this one only acts greedily")
        rng = rng if rng is not None else np.random.default_rng()
        if self.is_sequence_model:
            return self._sequence_actor(embedding, task, start, temperature, rng)
        if temperature <= 0:
            return lambda obs: self.act(obs, embedding)

        def sample(obs: np.ndarray) -> int:
            probs = self.action_probabilities(np.asarray(obs)[None], embedding[None], temperature)[0]
            return int(rng.choice(len(probs), p=probs / probs.sum()))

        return sample

    def _sequence_actor(self, embedding: np.ndarray, task: Any, start: np.ndarray, temperature: float,
                        rng: np.random.Generator) -> ActFn:
        """A Decision Transformer acting on its episode so far (d3rlpy's stateful
        wrapper keeps the last ``context`` steps), asked for the best return seen in its
        training data. It is told each step's reward, recomputed from the two states
        with the reward it was trained on (episodes trained on stored rewards are
        assumed to use the environment's sparse success reward)."""
        reward_name = self.config["train"].get("reward", "sparse")
        reward_fn = self._spec.rewards["sparse" if reward_name == "stored" else reward_name]
        start = np.asarray(start, dtype=np.float32).copy()

        def choose(output: np.ndarray):
            if not self.discrete:
                return np.asarray(output, dtype=np.float32)
            if temperature <= 0:
                return int(np.argmax(output))
            logits = torch.from_numpy(np.asarray(output, dtype=np.float64)) / temperature
            probs = torch.softmax(logits, dim=-1).numpy()
            return int(rng.choice(len(probs), p=probs / probs.sum()))

        wrapper = self.algo.as_stateful_wrapper(float(self.config.get("target_return", 1.0)), choose)
        previous: list[np.ndarray] = []

        def act(obs: np.ndarray):
            state = np.asarray(obs, dtype=np.float32)
            reward = float(reward_fn(task, previous[0], state, start)) if previous else 0.0
            previous[:] = [state]
            return wrapper.predict(np.concatenate([state, embedding]).astype(np.float32), reward)

        return act

    def act(self, state: np.ndarray, embedding: np.ndarray):
        self._refuse_sequence_model()
        x = np.concatenate([np.asarray(state, dtype=np.float32), embedding])[None]
        action = self.algo.predict(x)[0]
        return int(action) if np.ndim(action) == 0 else np.asarray(action, dtype=np.float32)

    def act_batch(self, states: np.ndarray, embeddings: np.ndarray, temperature: float = 0.0,
                  generator: torch.Generator | None = None) -> np.ndarray:
        """Actions for a batch of states, each with its instruction's embedding: greedy
        at ``temperature`` 0, otherwise drawn from :meth:`action_probabilities`."""
        self._refuse_sequence_model()
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
        self._refuse_sequence_model()
        if not self.samples:  # discrete BCQ has an imitator too, but it is the data's policy, not its own
            raise ValueError(f"{self.name}: sampling actions needs a policy with a discrete action distribution "
                             "(discrete BC or Decision Transformer); this one only acts greedily")
        imitator = self.algo.impl.modules.imitator
        x = torch.from_numpy(self._inputs(states, embeddings)).to(self.algo.impl.device)
        scaler = self.algo.config.observation_scaler  # what d3rlpy's predict applies before the network
        with torch.no_grad():
            output = imitator(scaler.transform(x) if scaler else x)
        return torch.softmax(output.logits.float().cpu() / temperature, dim=-1).numpy().astype(np.float64)

    def _refuse_sequence_model(self) -> None:
        if self.is_sequence_model:
            raise ValueError(f"{self.name} is a sequence model: it acts on its episode's history, through "
                             "episode_actor(), not on single states")

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
