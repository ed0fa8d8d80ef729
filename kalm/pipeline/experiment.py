"""What one KALM experiment is: :class:`PipelineConfig`, with one :class:`LevelPlan` per
imagined level, built from presets or JSON overrides and checked before any work starts.

The measurements behind the defaults are in docs/results.md; comments here say why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kalm.data.collect import CollectConfig
from kalm.data.hindsight import HindsightConfig
from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec
from kalm.grounding.finetune import GroundingConfig
from kalm.imagine.rollouts import ImagineConfig
from kalm.offline.config import TrainConfig, algos_for, has_action_distribution
from kalm.parallel import process_group

NOVEL_LEVELS = ("rephrase", "easy", "hard")


@dataclass(frozen=True)
class LevelPlan:
    """How one novel level is imagined. A field left ``None`` takes the value of
    ``PipelineConfig.imagine`` (``n``, ``starts_per_instruction``) or of its
    ``generation`` (``max_steps``, ``temperature``).

    ``compose`` imagines the level's conjunctions (``all_of`` tasks) one part at a
    time (:mod:`kalm.imagine.compose`); its other instructions are imagined whole.
    """

    n: int | None = None
    max_steps: int | None = None
    starts_per_instruction: int | None = None
    temperature: float | None = None
    compose: bool = False

    def __post_init__(self):
        for name, low in (("n", 1), ("max_steps", 1), ("starts_per_instruction", 1), ("temperature", 0)):
            value = getattr(self, name)
            if value is None:
                continue
            number = (int, float) if name == "temperature" else int
            if isinstance(value, bool) or not isinstance(value, number) or value < low:
                raise ValueError(f"{name} must be a {'number' if name == 'temperature' else 'whole number'} "
                                 f">= {low} or null, got {value!r}")
        if not isinstance(self.compose, bool):
            raise ValueError(f"compose must be true or false, got {self.compose!r}")

    def imagine_config(self, base: ImagineConfig, level: str) -> ImagineConfig:
        """``base`` with this plan's values filled in, for ``level``."""
        generation = base.generation
        generation = replace(generation,
                             max_steps=generation.max_steps if self.max_steps is None else self.max_steps,
                             temperature=generation.temperature if self.temperature is None else self.temperature)
        return replace(base, level=level, n=base.n if self.n is None else self.n,
                       compose=base.compose or self.compose,
                       starts_per_instruction=(base.starts_per_instruction if self.starts_per_instruction is None
                                               else self.starts_per_instruction),
                       generation=generation)


def _default_levels() -> dict[str, LevelPlan]:
    # Volume matters: a sixth to a quarter of the sampled rephrase and easy rollouts
    # reach their goal in imagination and about 2 % of the composed hard ones survive
    # every check. Rephrase: each held-out instruction from 6 starts, capped at 3 pushes
    # (the expert needs 2.8; longer imagined rollouts were rarely real on replay).
    # Rephrase and easy actions are sampled: greedy decoding of a weakly grounded model
    # collapses onto the push directions it is surest of. Hard stays greedy (sampling
    # kept fewer composed rollouts) and its whole-task instructions are capped at 4 steps.
    # KALM's hard lead grows with the hard rollouts kept: 16,000 prompts (316 kept) gave
    # +8.1 points where 8,000 (161 kept) gave +3.8, for two more minutes of imagination.
    return {
        "rephrase": LevelPlan(n=14400, max_steps=3, starts_per_instruction=6, temperature=1.0),
        "easy": LevelPlan(n=1920, temperature=1.0),
        "hard": LevelPlan(n=16000, max_steps=4, compose=True),
    }


@dataclass(frozen=True)
class AblationPlan:
    """The imagination ablation without an LLM (:mod:`kalm.imagine.without_llm`): each
    level is imagined again, with the same plan, by the baseline's first-seed policy
    inside an MLP dynamics model of ``dynamics_steps`` Adam steps (early-stopped), and
    a third policy per seed trains on real + those rollouts."""

    enabled: bool = True
    dynamics_steps: int = 2000
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be true or false, got {self.enabled!r}")
        if isinstance(self.dynamics_steps, bool) or not isinstance(self.dynamics_steps, int) or self.dynamics_steps < 1:
            raise ValueError(f"dynamics_steps must be a whole number >= 1, got {self.dynamics_steps!r}")


@dataclass(frozen=True)
class PipelineConfig:
    """One KALM experiment. The defaults are ``clevr-default``: the README's main job,
    sized for about 30 minutes on 2 CPU cores with the embedded SmolLM2-135M.

    ``levels`` maps each imagined level, in order, to its :class:`LevelPlan`.
    ``hindsight``: simulator rollouts labelled with the one goal they achieved, for
    grounding (``grounding.hindsight_share`` of its examples) and for scoring
    explanation where the answer is determined; ``episodes=0`` leaves them out.
    ``ablation``: the same levels imagined without an LLM, trained on and evaluated
    beside KALM (:class:`AblationPlan`).
    ``grounded_model``: a model directory written by ``kalm ground`` (for instance on a
    GPU machine); when set, the ground stage adopts it instead of training, and ``llm``
    and ``grounding`` are not used.
    ``algos``: further offline-RL algorithms, each trained with and without the same
    imagined files for every seed and evaluated on the same episodes as ``train.algo``
    (:func:`train_config_for` gives each its own reference batch size and learning rate).
    ``eval_temperature`` / ``eval_epsilon``: how trained policies act (:func:`acting_for`).
    """

    env: str = "clevr"
    llm: str = "smollm2"
    grounded_model: str = ""
    collect: CollectConfig = field(default_factory=lambda: CollectConfig(episodes=1600, epsilon=0.1))
    # 2,000 random-push rollouts (10 s) so that every run scores explanation on 200
    # held-out trajectories with one right answer; with hindsight_share 0 (the default:
    # training on them did not help, docs/grounding.md) none of them is trained on.
    hindsight: HindsightConfig = field(default_factory=lambda: HindsightConfig(episodes=2000))
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    levels: dict[str, LevelPlan] = field(default_factory=_default_levels)
    imagine: ImagineConfig = field(default_factory=lambda: ImagineConfig(n=240))
    ablation: AblationPlan = field(default_factory=AblationPlan)
    # Half of each batch is imagined (the paper's 1:1), split evenly between the levels;
    # pooled by transitions, the many rephrase rollouts would crowd out easy and hard.
    # With thousands of kept rollouts and sampled evaluation, KALM's lead on easy
    # grew from +32.9 points at a tenth to +42.3 at half, seen tasks unharmed; at 0.7
    # seen fell 4 points and rephrase's lead halved (docs/results.md).
    train: TrainConfig = field(default_factory=lambda: TrainConfig(algo="bc", steps=5000, imaginary_ratio=0.5,
                                                                   imaginary_mix="per_source"))
    # Five training seeds: one seed's policy moves a level by several points, so the
    # paired comparison pools 5 x 300 episodes per level.
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    eval_episodes: int = 300
    eval_seed: int = 1000  # training seed s is evaluated on plan eval_seed + s
    # Trained policies act by sampling from their own action distribution at this
    # temperature (0: greedy), every method alike. A greedy policy that pushes a ball
    # into a wall sees the same state again and repeats the push until the horizon;
    # sampling breaks the loop. On the 2026-12-06 baseline (5 seeds x 300 seen episodes)
    # seen success was 58 % greedy and 64 / 69 / 78 / 82 / 85 / 87 / 83 % at 0.25 / 0.5 /
    # 1 / 1.5 / 2 / 3 / 5 (docs/results.md).
    eval_temperature: float = 3.0
    # Policies without an action distribution (Q-learners: CQL, BCQ) cannot sample; on a
    # discrete action space they take a uniformly random action this often instead (as
    # in DQN's and d3rlpy's evaluations), which breaks the same loops.
    eval_epsilon: float = 0.1
    algos: tuple[str, ...] = ()
    llm_policy_episodes: int = 48
    showcases: int = 3

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))


def train_config_for(config: PipelineConfig, algo: str | None = None) -> TrainConfig:
    """The training settings of ``algo`` (``None``: ``config.train.algo``) in this
    experiment: ``config.train`` itself, or for another algorithm the same steps, data
    mixing and encoder with that algorithm's own batch size and learning rate."""
    if algo is None or algo == config.train.algo:
        return config.train
    return replace(config.train, algo=algo, batch_size=None, learning_rate=None)


def llm_policy_acting(config: PipelineConfig, spec: EnvSpec) -> dict[str, float]:
    """How the grounded LLM acts as a policy: like the BC policies, sampling at
    ``eval_temperature`` (discrete actions; continuous ones are greedy), so the rows
    compare the policies rather than two ways of acting; at the time scale it was
    grounded at (``every`` steps per waypoint, where the env has waypoints)."""
    acting = {"temperature": float(config.eval_temperature) if spec.discrete else 0.0}
    if spec.waypoints is not None:
        acting["every"] = spec.waypoints.every
    return acting


def acting_for(config: PipelineConfig, spec: EnvSpec, algo: str | None = None) -> dict[str, float]:
    """How a trained ``algo`` policy acts in evaluation, as ``TrainedPolicy`` keyword
    arguments: sampling at ``eval_temperature`` where it has an action distribution;
    otherwise greedily, with ``eval_epsilon`` random actions on a discrete action space."""
    algo = algo or config.train.algo
    if has_action_distribution(algo, spec.discrete):
        return {"temperature": float(config.eval_temperature)}
    if spec.discrete and config.eval_epsilon > 0:
        return {"temperature": 0.0, "epsilon": float(config.eval_epsilon)}
    return {"temperature": 0.0}


def apply_overrides(base, overrides: Mapping[str, Any], where: str):
    """``base`` (a config dataclass) with the JSON object ``overrides`` applied: nested
    objects override nested configs field by field, arrays replace tuples, and in a
    mapping of plans (``levels``) an object updates a plan, a new name adds one and
    ``null`` removes one. Unknown fields and wrong types are refused, naming the field."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(overrides).__name__}")
    names = {f.name: f for f in dataclasses.fields(base)}
    values = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"{where}: unknown field {key!r} (expected one of {', '.join(names)})")
        values[key] = _override(getattr(base, key), value, f"{where}.{key}")
    try:
        return replace(base, **values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _override(current, value, where: str):
    if dataclasses.is_dataclass(current):
        return apply_overrides(current, value, where)
    if isinstance(current, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
        merged = dict(current)
        for name, plan in value.items():
            if plan is None:
                merged.pop(name, None)
            else:
                merged[name] = apply_overrides(merged.get(name, LevelPlan()), plan, f"{where}.{name}")
        return merged
    if isinstance(current, tuple):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a JSON array, got {type(value).__name__}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if current is not None and value is not None and type(value) is not type(current) and not (
            isinstance(current, float) and type(value) is int):
        raise ValueError(f"{where}: expected {type(current).__name__}, got {type(value).__name__} "
                         f"({json.dumps(value)[:60]})")
    return value


def check_config(config: PipelineConfig) -> EnvSpec:
    """Refuse a config that would fail in a later stage before any work starts (and
    before anything is written), naming the field; returns the env's spec."""
    try:
        spec = get_spec(config.env)
    except ValueError as exc:
        raise ValueError(f"config field 'env': {exc}") from None
    try:
        config.collect.check(spec)
    except (TypeError, ValueError) as exc:  # TypeError: a mistyped value compared with a number
        raise ValueError(f"config field 'collect': {exc}") from None
    if config.hindsight.episodes:
        try:
            config.hindsight.check(spec)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config field 'hindsight': {exc}") from None
    elif config.grounding.hindsight_share > 0 and not config.grounded_model:
        raise ValueError("config field 'grounding.hindsight_share': needs hindsight episodes (hindsight.episodes > 0)")
    for level, plan in config.levels.items():
        if level not in spec.levels:
            raise ValueError(f"config field 'levels': unknown level {level!r} (levels: {', '.join(spec.levels)})")
        if not isinstance(plan, LevelPlan):
            raise ValueError(f"config field 'levels': the plan for {level!r} is not a LevelPlan ({plan!r})")
    processes = process_group()[1]
    if not config.grounded_model and config.grounding.micro_batches % processes:
        raise ValueError(f"config field 'grounding.micro_batches': {config.grounding.micro_batches} micro-batches "
                         f"per step cannot be shared by {processes} processes; make it a multiple, e.g. "
                         f'{{"grounding": {{"micro_batches": {processes}}}}} (the global batch, alike on any '
                         "process count)")
    if not config.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in config.seeds):
        raise ValueError(f"config field 'seeds': expected non-negative integers, got {list(config.seeds)}")
    temperature = config.eval_temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"config field 'eval_temperature': expected a number >= 0 (0: greedy), got {temperature!r}")
    epsilon = config.eval_epsilon
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon <= 1:
        raise ValueError(f"config field 'eval_epsilon': expected a number in [0, 1], got {epsilon!r}")
    available = algos_for(spec.discrete)
    for algo in (config.train.algo, *config.algos):
        if algo not in available:
            field_name = "train.algo" if algo == config.train.algo else "algos"
            raise ValueError(f"config field {field_name!r}: {algo!r} is not available for {spec.name} "
                             f"(use {', '.join(available)})")
    if len(set(config.algos)) != len(config.algos) or config.train.algo in config.algos:
        raise ValueError(f"config field 'algos': each algorithm once, and not train.algo ({config.train.algo}) "
                         f"again, got {list(config.algos)}")
    for name in ("eval_episodes", "llm_policy_episodes", "showcases"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < (0 if name == "showcases" else 1):
            raise ValueError(f"config field {name!r}: expected a positive integer, got {value!r}")
    if config.grounded_model:
        from kalm.grounding.checkpoint import check_grounded_model_dir

        try:
            check_grounded_model_dir(config.grounded_model, spec)
        except ValueError as exc:
            raise ValueError(f"config field 'grounded_model': {exc}") from None
    else:
        from kalm.grounding.backbone import check_backbone

        if not isinstance(config.llm, str) or not config.llm:
            raise ValueError(f"config field 'llm': expected a model directory or name, got {config.llm!r}")
        check_backbone(config.llm)
    return spec
