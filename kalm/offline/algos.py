"""d3rlpy algorithm configurations for a :class:`~kalm.offline.config.TrainConfig`.

Discrete or continuous is read from the env spec's action space, never from the env's
name (:func:`kalm.offline.config.algos_for` lists what each supports). Defaults follow
KALM's Table 3 / reference §7 (MLP in→256→256; discrete BC batch 100, lr 1e-3; TD3+BC
batch 256, lr 3e-4; AWAC batch 1024, lr 3e-4, λ 1) except where noted in
:mod:`kalm.offline.config`.
"""

from __future__ import annotations

import d3rlpy

from kalm.envs.spec import EnvSpec
from kalm.offline.config import TrainConfig, algos_for

SEQUENCE_ALGOS = ("dt",)  # trained on trajectory slices, act on their history

# What d3rlpy calls each learner (``LearnableConfig.get_type()``), to check that a
# policy directory's algo.json holds the algorithm its config.json names.
_D3RLPY_TYPES = {
    ("bc", True): "discrete_bc", ("cql", True): "discrete_cql", ("bcq", True): "discrete_bcq",
    ("dt", True): "discrete_decision_transformer", ("bc", False): "bc", ("cql", False): "cql",
    ("td3plusbc", False): "td3_plus_bc", ("iql", False): "iql", ("awac", False): "awac",
    ("dt", False): "decision_transformer",
}


def d3rlpy_type(algo: str, discrete: bool) -> str:
    """d3rlpy's name for the learner of ``algo`` on this kind of action space."""
    return _D3RLPY_TYPES[(algo, discrete)]


def build_algo_config(
    config: TrainConfig, spec: EnvSpec, observation_scaler: d3rlpy.preprocessing.ObservationScaler | None = None
) -> d3rlpy.base.LearnableConfig:
    """The d3rlpy config for this training run (raises ``ValueError`` for an algorithm
    the action space does not support)."""
    if config.algo not in algos_for(spec.discrete):
        kind = f"{spec.action_dim} discrete actions" if spec.discrete else "continuous actions"
        raise ValueError(f"algorithm {config.algo!r} is not available for {spec.name}, which has {kind} "
                         f"(use one of {', '.join(algos_for(spec.discrete))})")
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(config.hidden_units), activation="relu")
    lr = config.resolved_learning_rate()
    batch = config.resolved_batch_size()
    if config.algo == "dt":
        return _decision_transformer(config, spec, observation_scaler, encoder, batch, lr)
    if spec.discrete:
        return _discrete(config, observation_scaler, encoder, batch, lr)
    common = {"batch_size": batch, "gamma": config.gamma, "observation_scaler": observation_scaler}
    actor_critic = {"actor_encoder_factory": encoder, "critic_encoder_factory": encoder}
    if config.algo == "bc":
        return d3rlpy.algos.BCConfig(batch_size=batch, learning_rate=lr, encoder_factory=encoder,
                                     observation_scaler=observation_scaler)
    if config.algo == "cql":
        return d3rlpy.algos.CQLConfig(**common, **actor_critic, actor_learning_rate=lr, critic_learning_rate=3 * lr,
                                      conservative_weight=config.cql_alpha)
    if config.algo == "td3plusbc":
        return d3rlpy.algos.TD3PlusBCConfig(**common, **actor_critic, actor_learning_rate=lr, critic_learning_rate=lr,
                                            alpha=config.td3_alpha)
    if config.algo == "awac":
        return d3rlpy.algos.AWACConfig(**common, **actor_critic, actor_learning_rate=lr, critic_learning_rate=lr,
                                       lam=config.awac_lambda)
    return d3rlpy.algos.IQLConfig(**common, **actor_critic, actor_learning_rate=lr, critic_learning_rate=lr,
                                  value_encoder_factory=encoder)


def _discrete(config: TrainConfig, observation_scaler, encoder, batch: int, lr: float) -> d3rlpy.base.LearnableConfig:
    if config.algo == "bc":
        return d3rlpy.algos.DiscreteBCConfig(batch_size=batch, learning_rate=lr, beta=config.bc_beta,
                                             encoder_factory=encoder, observation_scaler=observation_scaler)
    q_learning = {"batch_size": batch, "learning_rate": lr, "gamma": config.gamma, "encoder_factory": encoder,
                  "target_update_interval": config.target_update_interval, "observation_scaler": observation_scaler}
    if config.algo == "cql":
        return d3rlpy.algos.DiscreteCQLConfig(**q_learning, alpha=config.cql_alpha)
    # d3rlpy's beta is the weight of the imitator's logit penalty, as in discrete BC
    return d3rlpy.algos.DiscreteBCQConfig(**q_learning, action_flexibility=config.bcq_threshold, beta=config.bc_beta)


def _decision_transformer(config: TrainConfig, spec: EnvSpec, observation_scaler, encoder, batch: int,
                          lr: float) -> d3rlpy.base.LearnableConfig:
    """d3rlpy's Decision Transformer, its width the state encoder's output. The
    timestep embedding must cover the longest episode; dropout stays at d3rlpy's 0.1."""
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=[config.dt_width], activation="relu")
    shape = {"batch_size": batch, "learning_rate": lr, "encoder_factory": encoder,
             "context_size": config.dt_context, "max_timestep": spec.max_episode_steps + 1,
             "num_layers": config.dt_layers, "num_heads": config.dt_heads, "observation_scaler": observation_scaler}
    if spec.discrete:
        # A constant learning rate, as in the continuous one: d3rlpy's discrete schedule
        # counts tokens in the learner's memory, which no checkpoint holds, so a resumed
        # run would warm up again and not end where an uninterrupted one does. No warm-up
        # and a cosine over 10^15 tokens keeps the multiplier at 1.
        return d3rlpy.algos.DiscreteDecisionTransformerConfig(**shape, warmup_tokens=0, final_tokens=10**15)
    return d3rlpy.algos.DecisionTransformerConfig(**shape)
