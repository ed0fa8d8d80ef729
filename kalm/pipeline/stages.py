"""The stages of ``kalm run``, each cached in ``<out>/stages/<name>-<key>/``.

A stage's key covers its config, the keys of the stages it reads and the code that
computes it (:mod:`kalm.pipeline.cache`): a rerun after a crash or a change redoes only
what changed. Long stages (grounding, policy training) checkpoint inside their partial
directory and resume there. This module only wires configs and files between the
library's functions; what a stage computes lives in the modules its ``code`` names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from kalm.data.collect import collect_to_file
from kalm.data.episodes import load_episodes, save_episodes
from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec
from kalm.evaluation.evaluate import evaluate, resolve_levels
from kalm.evaluation.policies import TrainedPolicy
from kalm.files import read_json
from kalm.offline.config import TrainConfig
from kalm.parallel import is_main_process, process_group, shard, wait_for_everyone
from kalm.pipeline.cache import StageCache, StageOutput, directory_digest
from kalm.pipeline.experiment import PipelineConfig, acting_for, llm_policy_acting, train_config_for
from kalm.threads import free_cores, set_torch_threads

# Settings that change how fast grounding runs, not what it produces: not in its key.
RUNTIME_ONLY = frozenset({"num_threads", "eval_batch_size", "train_attention"})
# Generated rollouts per level replayed in the simulator, kept or not: enough for a share
# within about a point, in seconds.
REPLAYED_GENERATED = 2000


def _as_json(obj) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj), default=list))


def collect_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig) -> StageOutput:
    def build(work: Path):
        dataset = collect_to_file(spec, config.collect, work / "real.h5", workers=free_cores())
        return {"episodes": len(dataset.episodes), "success_rate": dataset.success_rate}

    return cache.run("collect", {"env": spec.name, "collect": _as_json(config.collect)}, build,
                     code=["kalm.data.collect"], scope="collective")


def hindsight_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig) -> StageOutput | None:
    """Hindsight-labelled simulator rollouts for grounding; None when the config has none."""
    if config.hindsight.episodes == 0 or config.grounded_model:
        return None

    def build(work: Path):
        dataset = collect_to_file(spec, config.hindsight, work / "hindsight.h5", desc=f"hindsight {spec.name}",
                                  workers=free_cores())
        lengths = [ep.length for ep in dataset.episodes]
        return {"episodes": len(lengths), "mean_length": sum(lengths) / len(lengths)}

    return cache.run("hindsight", {"env": spec.name, "hindsight": _as_json(config.hindsight)}, build,
                     code=["kalm.data.hindsight"], scope="collective")


def ground_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, real: StageOutput | None,
                 hindsight: StageOutput | None = None) -> StageOutput:
    if config.grounded_model:
        return adopt_grounded_stage(cache, spec, Path(config.grounded_model))
    from kalm.grounding.finetune import train_grounding

    def build(work: Path):
        dataset = load_episodes(real.path / "real.h5", spec)
        extra = load_episodes(hindsight.path / "hindsight.h5", spec) if hindsight else None
        resume = (work / "checkpoints").exists()
        return train_grounding(spec, dataset, config.llm, work, config.grounding, resume=resume, hindsight=extra)

    settings = {k: v for k, v in config.grounding.to_json().items() if k not in RUNTIME_ONLY}
    inputs = {"real": real.key, **({"hindsight": hindsight.key} if hindsight else {})}
    return cache.run("ground", {"llm": config.llm, "grounding": settings}, build, inputs,
                     code=["kalm.grounding.finetune"], scope="collective")


def adopt_grounded_stage(cache: StageCache, spec: EnvSpec, source: Path) -> StageOutput:
    """The ground stage for a model grounded elsewhere: a copy, keyed by its content, so
    a changed model redoes everything downstream. Its ``metrics.json`` (written beside
    ``model/`` by ``kalm ground``) becomes the stage summary shown in the report."""

    def build(work: Path):
        from kalm.grounding.checkpoint import load_grounded

        shutil.copytree(source, work / "model")
        load_grounded(work / "model", spec)  # a damaged copy is refused before the stage is trusted
        metrics = source.parent / "metrics.json"
        summary = read_json(metrics, "grounding metrics") if metrics.is_file() else {}
        return {**summary, "adopted_from": str(source.resolve())}

    return cache.run("ground", {"grounded_model": directory_digest(source)}, build,
                     code=["kalm.grounding.checkpoint"])


class GroundedModel:
    """The run's grounded model, loaded once (LoRA merged, in the inference precision)
    by whichever stage needs it first; torch threads are set for each stage that asks,
    since a cached grounding stage never set them."""

    def __init__(self, stage: StageOutput, spec: EnvSpec, precision: str):
        self.stage, self.spec, self.precision = stage, spec, precision
        self._model = None

    def get(self):
        set_torch_threads()
        if self._model is None:
            from kalm.grounding.checkpoint import load_grounded

            try:
                model = load_grounded(self.stage.path / "model", self.spec).merge_lora()
            except ValueError as exc:
                raise ValueError(f"{exc}; delete the stage directory {self.stage.path} to rebuild it") from None
            self._model = model.use_inference_precision(self.precision)
        return self._model


def imagine_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, model: GroundedModel,
                  level: str) -> StageOutput:
    from kalm.evaluation.imagined import replay_generated, replay_imagined
    from kalm.imagine.rollouts import PROMPT_DRAW, imagine

    imagine_config = config.levels[level].imagine_config(config.imagine, level)

    def build(work: Path):
        result = imagine(model.get(), spec, imagine_config)  # every process: it shards the rollouts
        if not is_main_process():
            return None
        if result.dataset is not None:
            save_episodes(result.dataset, work / "imagined.h5")
        # audit only: the replay never changes what was kept
        return {**result.stats, "replay": replay_imagined(spec, result.dataset),
                "replay_generated": replay_generated(spec, result.attempts, REPLAYED_GENERATED)}

    return cache.run(f"imagine-{level}", {**_as_json(imagine_config), "prompt_draw": PROMPT_DRAW}, build,
                     {"model": model.stage.key}, code=["kalm.imagine.rollouts", "kalm.evaluation.imagined",
                                                       "kalm.grounding.checkpoint"], scope="collective")


def dynamics_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, real: StageOutput) -> StageOutput:
    """The MLP dynamics model of the no-LLM ablation, trained on the real transitions."""
    from kalm.imagine.without_llm import fit_dynamics

    def build(work: Path):
        model, info = fit_dynamics(load_episodes(real.path / "real.h5", spec), spec, config.ablation.dynamics_steps,
                                   config.ablation.seed)
        model.save(work / "dynamics.safetensors")
        return info

    return cache.run("dynamics-mlp", _as_json(config.ablation), build, {"real": real.key},
                     code=["kalm.grounding.dynamics_baseline", "kalm.imagine.without_llm"])


def imagine_without_llm_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, policy: StageOutput,
                              dynamics: StageOutput, level: str) -> StageOutput:
    """The level imagined by the real-data policy inside the MLP dynamics model: the
    same prompts and filters as :func:`imagine_stage`, no LLM."""
    from kalm.evaluation.imagined import replay_generated, replay_imagined
    from kalm.imagine.rollouts import PROMPT_DRAW
    from kalm.imagine.without_llm import imagine_without_llm

    imagine_config = config.levels[level].imagine_config(config.imagine, level)

    def build(work: Path):
        result = imagine_without_llm(policy.path / "policy", dynamics.path / "dynamics.safetensors", spec,
                                     imagine_config)
        if result.dataset is not None:
            save_episodes(result.dataset, work / "imagined.h5")
        return {**result.stats, "replay": replay_imagined(spec, result.dataset),
                "replay_generated": replay_generated(spec, result.attempts, REPLAYED_GENERATED)}

    return cache.run(f"imagine-no-llm-{level}", {**_as_json(imagine_config), "prompt_draw": PROMPT_DRAW}, build,
                     {"policy": policy.key, "dynamics": dynamics.key},
                     code=["kalm.imagine.without_llm", "kalm.imagine.rollouts", "kalm.evaluation.imagined",
                           "kalm.offline.policy"])


def train_stage(cache: StageCache, config: PipelineConfig, method: str, seed: int, real: StageOutput,
                imagined: list[StageOutput], progress: bool = True, algo: str | None = None,
                scope: str = "main") -> StageOutput:
    """One policy of ``algo`` (default ``config.train.algo``) on the real data plus
    ``imagined``; ``method`` names it (``baseline``, ``kalm``, ``baseline-cql``, ...)."""
    from kalm.offline.train import train

    train_config = replace(train_config_for(config, algo), seed=seed)

    def build(work: Path):
        policy = work / "policy"
        resume = policy.is_dir() and any(policy.iterdir())  # a kill can come before the first checkpoint
        files = [s.path / "imagined.h5" for s in imagined if (s.path / "imagined.h5").exists()]
        result = train(real.path / "real.h5", policy, train_config, imaginary=files, resume=resume,
                       progress=progress)
        return {"steps": result.steps, "seconds": result.seconds}

    inputs = {"real": real.key, **{s.name: s.key for s in imagined}}
    return cache.run(f"train-{method}-s{seed}", {"train": train_key(train_config, imagined), "method": method}, build,
                     inputs, code=["kalm.offline.train"], scope=scope)


def train_key(train_config: TrainConfig, imagined: Sequence) -> dict:
    """The training settings that name a policy's stage. Without imagined data the
    imagined share and mix change nothing, so they are left out: trying another share
    retrains the KALM policies and reuses the baseline."""
    settings = train_config.to_json()
    if not imagined:
        settings = {k: v for k, v in settings.items() if k not in ("imaginary_ratio", "imaginary_mix")}
    return settings


def plan_seed(config: PipelineConfig, training_seed: int) -> int:
    """The evaluation plan (instructions and start states) for one training seed.

    Baseline and KALM policies of the same training seed face the same episodes (a
    paired comparison), while each seed gets its own draw: pooling the seeds then pools
    independent episodes, which the confidence intervals assume. With one plan for
    every seed, a few hundred rephrasings would decide the rephrase level."""
    return config.eval_seed + training_seed


def evaluate_stage(cache: StageCache, spec: EnvSpec, name: str, make_policy: Callable, episodes: int,
                   plan: int, inputs: Mapping[str, str], code: list[str], progress: bool = True,
                   acting: Mapping[str, float] | None = None, scope: str = "main") -> StageOutput:
    def build(work: Path):
        levels = resolve_levels(spec, "all", plan)
        results = evaluate(make_policy(), spec, levels, episodes, plan, progress=progress)
        if scope == "collective" and not is_main_process():
            return None
        (work / "results.json").write_text(json.dumps(results))
        return {level: r["success_rate"] for level, r in results["levels"].items()}

    return cache.run(f"evaluate-{name}", {"episodes": episodes, "seed": plan, **(acting or {})}, build, inputs,
                     code=["kalm.evaluation.evaluate", *code], scope=scope)


def llm_policy_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, model: GroundedModel) -> StageOutput:
    """The grounded LLM itself as the policy, on every level."""

    def make_policy():
        from kalm.imagine.llm_policy import LLMPolicy

        return LLMPolicy(model.get(), **acting)

    precision = config.imagine.precision
    acting = llm_policy_acting(config, spec)
    return evaluate_stage(cache, spec, "llm-policy", make_policy, config.llm_policy_episodes, config.eval_seed,
                          {"model": model.stage.key, "precision": precision},
                          ["kalm.imagine.llm_policy", "kalm.grounding.checkpoint"], acting=acting, scope="collective")


def embeddings_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, real: StageOutput,
                     plans: Mapping[str, tuple[str, list[StageOutput]]]) -> StageOutput:
    """Every instruction the policy jobs of ``plans`` (as for :func:`policy_stages`)
    meet: the real and imagined data and every seed's evaluation episodes, encoded once
    by each encoder they use into one cache file that every job preloads. Without it,
    each pool worker encoded them all again: alone, one policy's evaluation spent 14.5
    of its 34 s encoding, and the main job's 15 policies took 7:05 instead of 5:15."""
    from kalm.evaluation.evaluate import planned_texts
    from kalm.offline.encoder import encode_to_file

    imagined = list({s.key: s for _, extra in plans.values() for s in extra}.values())
    encoders = sorted({train_config_for(config, algo).encoder for algo, _ in plans.values()})
    evaluation_plans = [plan_seed(config, seed) for seed in config.seeds]

    def build(work: Path):
        files = [real.path / "real.h5", *(s.path / "imagined.h5" for s in imagined)]
        texts = {e.instruction for path in files if path.exists() for e in load_episodes(path, spec).episodes}
        for plan in evaluation_plans:
            texts.update(planned_texts(spec, config.eval_episodes, plan))
        for name in encoders:
            encode_to_file(name, sorted(texts), work / EMBEDDINGS_FILE, workers=free_cores())
        return {"texts": len(texts), "encoders": encoders}

    return cache.run("embeddings", {"encoders": encoders, "episodes": config.eval_episodes, "plans": evaluation_plans},
                     build,
                     {"real": real.key, **{s.name: s.key for s in imagined}},
                     code=["kalm.offline.encoder", "kalm.evaluation.evaluate"])


EMBEDDINGS_FILE = "embeddings.safetensors"


def policy_job(stages: Path, config: PipelineConfig, method: str, seed: int, real: StageOutput,
               imagined: list[StageOutput], progress: bool = True, algo: str | None = None,
               scope: str = "main", embeddings: StageOutput | None = None) -> tuple[StageOutput, StageOutput]:
    """Train one offline-RL policy and evaluate it: ``(train stage, evaluation stage)``.
    Top-level so a worker process can run it; both stages are cached as usual.

    One torch thread throughout, as training sets: when the training is already cached,
    the evaluation alone would otherwise run on the process's default threads, fighting
    the other worker for the cores. The instructions' vectors come from ``embeddings``
    (:func:`embeddings_stage`) where given."""
    set_torch_threads(1)
    if embeddings is not None:
        from kalm.offline.encoder import preload_embeddings

        preload_embeddings(train_config_for(config, algo).encoder, embeddings.path / EMBEDDINGS_FILE)
    cache, spec = StageCache(stages), get_spec(config.env)
    stage = train_stage(cache, config, method, seed, real, imagined, progress, algo, scope)
    acting = acting_for(config, spec, algo)
    evaluation = evaluate_stage(cache, spec, f"{method}-s{seed}",
                                lambda: TrainedPolicy(stage.path / "policy", **acting), config.eval_episodes,
                                plan_seed(config, seed), {"policy": stage.key}, ["kalm.evaluation.policies"], progress,
                                acting, scope)
    return stage, evaluation


def policy_stages(cache: StageCache, config: PipelineConfig, real: StageOutput,
                  plans: Mapping[str, tuple[str, list[StageOutput]]], vectors: StageOutput | None = None,
                  ) -> dict[tuple[str, int], tuple[StageOutput, StageOutput]]:
    """Every (method, seed) policy trained and evaluated: ``{(method, seed): (train, evaluation)}``.
    ``plans`` maps each method to its algorithm and the imagined stages it trains on
    besides the real data (``[]`` for a baseline); ``vectors`` is the
    :func:`embeddings_stage` of these plans, if any.

    Why processes: d3rlpy's networks are small, so a training run (and the simulator in
    evaluation) keeps one core busy and no more; with two cores idle, two policies
    train and evaluate at once in spawned workers (one torch thread each), which nearly
    halves this part of the run. With one idle core they run here, in order, with their
    own progress bars. Under ``accelerate launch`` with N processes, process ``r`` runs
    jobs ``r, r + N, ...`` and then every process reads all of them from the cache.
    """
    jobs = [(method, seed, algo, extra) for seed in config.seeds for method, (algo, extra) in plans.items()]
    index, count = process_group()
    if count > 1:
        for m, s, a, extra in shard(jobs, index, count):
            policy_job(cache.root, config, m, s, real, extra, index == 0, a, "local", vectors)
        wait_for_everyone()
        return {(m, s): policy_job(cache.root, config, m, s, real, extra, False, a, "local", vectors)
                for m, s, a, extra in jobs}
    workers = min(len(jobs), free_cores())
    if workers < 2:
        return {(m, s): policy_job(cache.root, config, m, s, real, extra, algo=a, embeddings=vectors)
                for m, s, a, extra in jobs}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    done = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(policy_job, cache.root, config, m, s, real, extra, False, a, "main", vectors): (m, s)
                   for m, s, a, extra in jobs}
        with tqdm(total=len(jobs), desc=f"train + evaluate policies ({workers} at once)", unit="policy") as bar:
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                bar.update()
    return {(m, s): done[(m, s)] for m, s, _, _ in jobs}


def showcase_stage(cache: StageCache, spec: EnvSpec, config: PipelineConfig, policy: StageOutput,
                   imagined: list[StageOutput]) -> StageOutput:
    """A few imagined rollouts next to the KALM policy's real execution of the same
    instruction from the same start (``showcase.json`` and one GIF each)."""
    from kalm.evaluation.showcase import write_showcase

    def build(work: Path):
        files = [s.path / "imagined.h5" for s in imagined if (s.path / "imagined.h5").exists()]
        per_file = max(1, config.showcases // max(len(imagined), 1))
        episodes = []
        for path in files:
            kept = load_episodes(path, spec).episodes
            episodes += ([e for e in kept if e.terminated] or list(kept))[:per_file]
        rows = write_showcase(spec, TrainedPolicy(policy.path / "policy", **acting), episodes, work)
        return {"rollouts": len(rows)}

    acting = acting_for(config, spec)
    return cache.run("showcase", {"n": config.showcases, **acting}, build,
                     {"policy": policy.key, **{s.name: s.key for s in imagined}},
                     code=["kalm.evaluation.showcase", "kalm.evaluation.policies"])
