"""Grounding a language model in an environment's states and actions (KALM step 1).

- :mod:`~kalm.grounding.backbone`: load any local causal LM, or the embedded SmolLM2.
- :mod:`~kalm.grounding.model`: :class:`GroundedLM`, the LM with state/action
  placeholders, encoders and heads; :mod:`~kalm.grounding.checkpoint`: save/load.
- :mod:`~kalm.grounding.prompts`: the four grounding tasks and the token layout
  ``s_0 a_0 s_1 ...`` (``a_t`` read at ``s_t``, ``s_{t+1}`` read at ``a_t``).
- :mod:`~kalm.grounding.finetune`: mixed-task fine-tuning (LoRA or full) with accelerate,
  checkpoints and resume; :mod:`~kalm.grounding.objective`: its losses and optimizer;
  :mod:`~kalm.grounding.metrics`: held-out metrics, decoded by
  :mod:`~kalm.grounding.decoding`.

This package reads episodes and env specs only; it never steps a simulator.
"""

from kalm.grounding.backbone import BackboneError, load_backbone
from kalm.grounding.checkpoint import GroundingCheckpointError, load_grounded
from kalm.grounding.finetune import GroundingConfig, train_grounding
from kalm.grounding.model import GroundedLM, GroundedLMConfig, LoraSettings, NormStats

__all__ = [
    "BackboneError",
    "GroundedLM",
    "GroundedLMConfig",
    "GroundingCheckpointError",
    "GroundingConfig",
    "LoraSettings",
    "NormStats",
    "load_backbone",
    "load_grounded",
    "train_grounding",
]
