"""``kalm run``: the whole experiment as cached, resumable stages.

- :mod:`~kalm.pipeline.experiment`: :class:`PipelineConfig` (one :class:`LevelPlan` per
  imagined level), JSON overrides and the up-front check;
- :mod:`~kalm.pipeline.presets`: the named experiments and :func:`load_config`;
- :mod:`~kalm.pipeline.stages`: each stage, cached by :mod:`~kalm.pipeline.cache`
  under a key of its config, its inputs and its code;
- :mod:`~kalm.pipeline.run`: :func:`run_pipeline`.
"""

from kalm.pipeline.experiment import LevelPlan, PipelineConfig, check_config
from kalm.pipeline.presets import PRESETS, load_config
from kalm.pipeline.run import run_pipeline

__all__ = ["PRESETS", "LevelPlan", "PipelineConfig", "check_config", "load_config", "run_pipeline"]
