"""d3rlpy algorithm configurations for a :class:`~kalm.offline.config.TrainConfig`.

Discrete or continuous is read from the env spec's action space, never from the env's
name: ``bc`` and ``cql`` exist in both forms, ``td3plusbc`` and ``iql`` only for
continuous actions. Defaults follow KALM's Table 3 / reference §7 (MLP in→256→256;
discrete BC batch 100, lr 1e-3; discrete CQL α 10, batch 32, lr 6.25e-5; TD3+BC batch
256, lr 3e-4) except where noted in :mod:`kalm.offline.config`.
"""

from __future__ import annotations

import d3rlpy

from kalm.envs.spec import EnvSpec
from kalm.offline.config import TrainConfig

DISCRETE_ALGOS = ("bc", "cql")
CONTINUOUS_ALGOS = ("bc", "cql", "td3plusbc", "iql")


def build_algo_config(
    config: TrainConfig, spec: EnvSpec, observation_scaler: d3rlpy.preprocessing.ObservationScaler | None = None
) -> d3rlpy.base.LearnableConfig:
    """The d3rlpy config for this training run (raises ``ValueError`` for an algorithm
    the action space does not support)."""
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(config.hidden_units), activation="relu")
    lr = config.resolved_learning_rate()
    batch = config.resolved_batch_size()
    if spec.discrete:
        if config.algo == "bc":
            return d3rlpy.algos.DiscreteBCConfig(
                batch_size=batch, learning_rate=lr, beta=config.bc_beta, encoder_factory=encoder,
                observation_scaler=observation_scaler,
            )
        if config.algo == "cql":
            return d3rlpy.algos.DiscreteCQLConfig(
                batch_size=batch,
                learning_rate=lr,
                gamma=config.gamma,
                alpha=config.cql_alpha,
                target_update_interval=config.target_update_interval,
                encoder_factory=encoder,
                observation_scaler=observation_scaler,
            )
        raise ValueError(
            f"algorithm {config.algo!r} needs continuous actions; {spec.name} has {spec.action_dim} discrete actions "
            f"(use one of {', '.join(DISCRETE_ALGOS)})"
        )
    common = {"batch_size": batch, "gamma": config.gamma, "observation_scaler": observation_scaler}
    if config.algo == "bc":
        return d3rlpy.algos.BCConfig(batch_size=batch, learning_rate=lr, encoder_factory=encoder,
                                     observation_scaler=observation_scaler)
    if config.algo == "cql":
        return d3rlpy.algos.CQLConfig(
            **common,
            actor_learning_rate=lr,
            critic_learning_rate=3 * lr,
            conservative_weight=config.cql_alpha,
            actor_encoder_factory=encoder,
            critic_encoder_factory=encoder,
        )
    if config.algo == "td3plusbc":
        return d3rlpy.algos.TD3PlusBCConfig(
            **common,
            actor_learning_rate=lr,
            critic_learning_rate=lr,
            alpha=config.td3_alpha,
            actor_encoder_factory=encoder,
            critic_encoder_factory=encoder,
        )
    if config.algo == "iql":
        return d3rlpy.algos.IQLConfig(
            **common,
            actor_learning_rate=lr,
            critic_learning_rate=lr,
            actor_encoder_factory=encoder,
            critic_encoder_factory=encoder,
            value_encoder_factory=encoder,
        )
    raise ValueError(f"unknown algorithm {config.algo!r} (continuous: {', '.join(CONTINUOUS_ALGOS)})")
