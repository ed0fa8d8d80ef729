"""``kalm run``: the whole KALM experiment as cached, resumable stages.

collect real data -> ground the LLM -> imagine rollouts per novel level (and again
without the LLM, for the ablation) -> train the offline-RL baseline (real only), KALM
(real + imagined) and the ablation (real + imagined without the LLM) with the same
algorithm, steps and seeds -> evaluate them, and the LLM itself as a policy, on all four
levels -> write ``run.json`` (which stage directories this run used) and the report, which
:mod:`kalm.report` builds from the run directory alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from kalm.files import write_json_atomic
from kalm.parallel import is_main_process
from kalm.pipeline.cache import RunLock, StageCache
from kalm.pipeline.experiment import PipelineConfig, acting_for, check_config, llm_policy_acting
from kalm.pipeline.stages import (
    GroundedModel,
    collect_stage,
    dynamics_stage,
    embeddings_stage,
    ground_stage,
    hindsight_stage,
    imagine_stage,
    imagine_without_llm_stage,
    llm_policy_stage,
    policy_stages,
    showcase_stage,
    train_stage,
)

MANIFEST = "run.json"


def run_pipeline(config: PipelineConfig, out: str | os.PathLike) -> Path:
    """Run (or resume) the experiment in ``out`` and return the report's path (written
    by the first process when several run it under ``accelerate launch``)."""
    from kalm.report import write_report

    spec = check_config(config)
    out = Path(out)
    main = is_main_process()
    # Under `accelerate launch` the processes share the run directory: the first holds
    # the lock and writes what is written once; the stages say who builds them.
    with RunLock(out) if main else nullcontext():
        if main:
            (out / "config.json").write_text(json.dumps(config.to_json(), indent=2))
        cache = StageCache(out / "stages")
        real = collect_stage(cache, spec, config)
        hindsight = hindsight_stage(cache, spec, config)
        grounded = ground_stage(cache, spec, config, real, hindsight)
        model = GroundedModel(grounded, spec, config.imagine.precision)
        imagined = [imagine_stage(cache, spec, config, model, level) for level in config.levels]
        trains_on = {"baseline": [], "kalm": imagined}
        if config.ablation.enabled:
            # the baseline's first policy, trained here first; the policy stages find it cached
            policy = train_stage(cache, config, "baseline", config.seeds[0], real, [])
            dynamics = dynamics_stage(cache, spec, config, real)
            trains_on["no-llm"] = [imagine_without_llm_stage(cache, spec, config, policy, dynamics, level)
                                   for level in config.levels]
        plans = {method: (config.train.algo, extra) for method, extra in trains_on.items()}
        for algo in config.algos:
            plans |= {f"baseline-{algo}": (algo, []), f"kalm-{algo}": (algo, imagined)}
        vectors = embeddings_stage(cache, spec, config, real, plans)
        policies = policy_stages(cache, config, real, plans, vectors)
        llm_evaluation = llm_policy_stage(cache, spec, config, model)
        show = showcase_stage(cache, spec, config, policies[("kalm", config.seeds[0])][0], imagined)

        def names(method: str, which: int) -> list[str]:
            return [policies[(method, seed)][which].path.name for seed in config.seeds]

        manifest = {
            "title": f"KALM on {spec.name} with {config.llm}",
            "env": spec.name,
            "algo": config.train.algo,
            "seeds": list(config.seeds),
            "eval_episodes": config.eval_episodes,
            "eval_temperature": config.eval_temperature,
            "acting": {algo: acting_for(config, spec, algo) for algo in (config.train.algo, *config.algos)},
            "llm_policy_episodes": config.llm_policy_episodes,
            "llm_policy_acting": llm_policy_acting(config, spec),
            "grounded_model": config.grounded_model,
            "stages": {
                "collect": real.path.name,
                "hindsight": hindsight.path.name if hindsight else None,
                "ground": grounded.path.name,
                # pairs, not an object: the levels keep their order in the sorted JSON
                "imagine": [[s.name.removeprefix("imagine-"), s.path.name] for s in imagined],
                "imagine-no-llm": [[s.name.removeprefix("imagine-no-llm-"), s.path.name]
                                   for s in trains_on.get("no-llm", [])],
                "dynamics-mlp": dynamics.path.name if config.ablation.enabled else None,
                "embeddings": vectors.path.name,
                "train": {method: names(method, 0) for method in trains_on},
                "evaluate": {method: names(method, 1) for method in trains_on},
                # algorithm -> its baseline's and its KALM policy's evaluation stages, and
                # the training stages of both
                "algorithms": {algo: _algorithm_stages(names, algo, algo == config.train.algo)
                               for algo in (config.train.algo, *config.algos)},
                "llm-policy": llm_evaluation.path.name,
                "showcase": show.path.name,
            },
        }
        if not main:
            return out / "report.md"
        write_json_atomic(out / MANIFEST, manifest)
        return write_report(out)


def _algorithm_stages(names: Callable[[str, int], list[str]], algo: str, main: bool) -> dict[str, list[str]]:
    """The stages behind one algorithm's rows of the report: its baseline's and its KALM
    policy's evaluations, and the training of both (for the stage times). The main
    algorithm's methods are plain ``baseline`` and ``kalm``."""
    baseline, kalm = ("baseline", "kalm") if main else (f"baseline-{algo}", f"kalm-{algo}")
    return {"baseline": names(baseline, 1), "kalm": names(kalm, 1), "train": names(baseline, 0) + names(kalm, 0)}
