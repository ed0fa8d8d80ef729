"""The settings of one offline-RL training run, stored next to the policy it produced."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kalm.offline.encoder import DEFAULT_ENCODER

ALGOS = ("bc", "cql", "td3plusbc", "iql")
IMAGINARY_MIXES = ("pooled", "per_source")

# (algo, discrete) -> (batch size, learning rate). KALM's Table 3 / reference §7 values,
# except discrete CQL: the reference's batch 32, lr 6.25e-5 is tuned for 500k steps and
# after 10k steps on CPU reached 34% on seen CLEVR tasks (below the random policy's
# 39%); batch 100, lr 1e-3 reached 62% in the same 10k steps (1600 expert episodes with
# epsilon 0.1, 100 evaluation episodes).
# Continuous CQL's lr is the actor's (the critic gets 3x, as in the reference).
_DEFAULTS: dict[tuple[str, bool], tuple[int, float]] = {
    ("bc", True): (100, 1e-3),
    ("cql", True): (100, 1e-3),
    ("bc", False): (100, 1e-3),
    ("cql", False): (256, 1e-4),
    ("td3plusbc", False): (256, 3e-4),
    ("iql", False): (256, 3e-4),
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run computes.

    Attributes:
        algo: ``bc``, ``cql``, ``td3plusbc`` or ``iql``.
        steps: gradient steps in total (a resumed run ends at the same count).
        seed: seeds the network initialisation and the batch sampler.
        batch_size / learning_rate: ``None`` takes the algorithm's reference value.
        gamma: the discount; timeouts bootstrap with it, successes do not.
        reward: a name from the env's ``rewards`` (``sparse``, ``shaped``) relabels
            every transition, real and imaginary alike, with the same function (the
            reference labelled the two differently, §9.7); ``stored`` trains on the
            rewards in the episode files. ``sparse`` is the default by measurement:
            discrete CQL reached 62% on seen tasks with it and 53% with ``shaped``.
        imaginary_ratio: share of each batch drawn from imaginary episodes (when any
            are given).
        imaginary_mix: how that share is spread over several imaginary files:
            ``pooled`` draws uniformly over all their transitions, ``per_source``
            gives each file an equal part (see :mod:`kalm.offline.buffers`).
            Neither wins everywhere, so the plain default is ``pooled`` (the files'
            natural proportions) and a pipeline chooses by measurement: split, a
            small poor source is repeated hundreds of times at a large imagined
            share; pooled, a large source crowds out the others. ``clevr-default``
            splits a 10 % share (docs/results.md, *How much rephrase data*).
        encoder: the instruction encoder (see :mod:`kalm.offline.encoder`).
        hidden_units: the MLP every network uses.
        cql_alpha: weight of CQL's conservative term.
        target_update_interval: discrete CQL's hard target-network update period.
            The reference's 8000 suits its 500k steps; over a 10k-step run it would
            refresh the target once, so the default is 1000.
        td3_alpha: TD3+BC's Q-term weight.
        bc_beta: weight of discrete BC's penalty. d3rlpy applies it to the squared
            *log-probabilities* (``Categorical.logits`` are normalised), which pulls
            the policy towards uniform; at its default 0.5 the imitation loss after
            3000 steps stayed at 2.65 (1.52 without it; success 41% vs 43% on 100
            seen episodes, within noise of each other).
        standardize: feed the networks observations standardised per dimension with
            the real data's mean and std (stored in the policy's algo.json). The
            instruction embedding's components are small (|x| < 0.2) and differ little
            between instructions. Measured on 100 seen episodes after 3000 BC steps:
            49% with it, 43% without (overlapping intervals; kept because it costs
            nothing and puts state and language on one scale).
        checkpoint_every: steps between checkpoints (and flushes of the loss curve).
        discrete: filled in by :meth:`for_action_space` from the env spec (the stored
            config records which family of algorithm ran).
    """

    algo: str = "bc"
    steps: int = 10000
    seed: int = 0
    batch_size: int | None = None
    learning_rate: float | None = None
    gamma: float = 0.99
    reward: str = "sparse"
    imaginary_ratio: float = 0.5
    imaginary_mix: str = "pooled"
    encoder: str = DEFAULT_ENCODER
    hidden_units: tuple[int, ...] = (256, 256)
    cql_alpha: float = 10.0
    target_update_interval: int = 1000
    td3_alpha: float = 2.5
    bc_beta: float = 0.0
    standardize: bool = True
    checkpoint_every: int = 1000
    discrete: bool | None = None

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"unknown algorithm {self.algo!r} (expected one of {', '.join(ALGOS)})")
        for name in ("steps", "checkpoint_every", "target_update_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.imaginary_ratio <= 1.0:
            raise ValueError(f"imaginary_ratio must be in [0, 1], got {self.imaginary_ratio}")
        if self.imaginary_mix not in IMAGINARY_MIXES:
            raise ValueError(
                f"imaginary_mix must be one of {', '.join(IMAGINARY_MIXES)}, got {self.imaginary_mix!r}")
        object.__setattr__(self, "hidden_units", tuple(int(h) for h in self.hidden_units))
        if not self.hidden_units or min(self.hidden_units) < 1:
            raise ValueError(f"hidden_units must be positive layer widths, got {self.hidden_units}")

    def for_action_space(self, discrete: bool) -> TrainConfig:
        """This config with the action type fixed and reference defaults filled in, so
        the stored config says exactly what ran."""
        key = (self.algo, discrete)
        if key not in _DEFAULTS:
            kind = "discrete" if discrete else "continuous"
            available = sorted(a for a, d in _DEFAULTS if d == discrete)
            raise ValueError(f"algorithm {self.algo!r} is not available for {kind} actions "
                             f"(use {', '.join(available)})")
        batch, lr = _DEFAULTS[key]
        return dataclasses.replace(
            self,
            discrete=discrete,
            batch_size=self.batch_size if self.batch_size is not None else batch,
            learning_rate=self.learning_rate if self.learning_rate is not None else lr,
        )

    def resolved_batch_size(self) -> int:
        if self.batch_size is None:
            raise ValueError("call for_action_space() before reading the batch size")
        return self.batch_size

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is None:
            raise ValueError("call for_action_space() before reading the learning rate")
        return self.learning_rate

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hidden_units"] = list(self.hidden_units)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"training config: unknown field {unknown[0]!r}")
        return cls(**data)
