"""kalm: knowledgeable agents by offline RL from large-language-model rollouts.

The pipeline, one folder each: ``envs`` (simulators, tasks, language) -> ``data``
(episode files) -> ``grounding`` (teach an LLM to read and write trajectories) ->
``imagine`` (the LLM writes rollouts for new instructions) -> ``offline`` (offline RL
on real + imagined episodes) -> ``evaluation`` (success rates in the real simulator);
``pipeline`` runs them all as cached stages and ``report`` shows the results.

Importing ``kalm`` registers the Gymnasium ids (``kalm/CLEVRRobot-v0``,
``kalm/MetaWorld-v0``). The names below are the public API; each is imported when
first used, so ``import kalm`` stays light (no torch until a model is needed).
"""

from importlib import import_module

from kalm import envs as _envs  # noqa: F401 - registers the Gymnasium ids

__version__ = "0.1.0"

# public name -> (module, attribute)
_API = {
    "get_spec": ("kalm.envs", "get_spec"),
    "Episode": ("kalm.data.episodes", "Episode"),
    "EpisodeDataset": ("kalm.data.episodes", "EpisodeDataset"),
    "load_episodes": ("kalm.data.episodes", "load_episodes"),
    "save_episodes": ("kalm.data.episodes", "save_episodes"),
    "CollectConfig": ("kalm.data.collect", "CollectConfig"),
    "collect": ("kalm.data.collect", "collect_to_file"),
    "export_minari": ("kalm.data.minari", "export_minari"),
    "import_minari": ("kalm.data.minari", "import_minari"),
    "GroundingConfig": ("kalm.grounding.finetune", "GroundingConfig"),
    "ground": ("kalm.grounding.finetune", "train_grounding"),
    "GroundedLM": ("kalm.grounding.model", "GroundedLM"),
    "ImagineConfig": ("kalm.imagine.rollouts", "ImagineConfig"),
    # not "imagine": importing the kalm.imagine package binds that name to the package
    "imagine_rollouts": ("kalm.imagine.rollouts", "imagine"),
    "imagine_without_llm": ("kalm.imagine.without_llm", "imagine_without_llm"),
    "TrainConfig": ("kalm.offline.config", "TrainConfig"),
    "train_policy": ("kalm.offline.train", "train"),
    "evaluate_policy": ("kalm.evaluation.evaluate", "evaluate_policy"),
    "PipelineConfig": ("kalm.pipeline.experiment", "PipelineConfig"),
    "LevelPlan": ("kalm.pipeline.experiment", "LevelPlan"),
    "load_config": ("kalm.pipeline.presets", "load_config"),
    "run_pipeline": ("kalm.pipeline.run", "run_pipeline"),
    "write_report": ("kalm.report", "write_report"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'kalm' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
