"""kalm: knowledgeable agents by offline RL from large-language-model rollouts.

The pipeline, one folder each: ``envs`` (simulators, tasks, language) -> ``data``
(episode files) -> ``grounding`` (teach an LLM to read and write trajectories) ->
``imagine`` (the LLM writes rollouts for new instructions) -> ``offline`` (offline RL
on real + imagined episodes) -> ``evaluation`` (success rates in the real simulator).
"""

__version__ = "0.1.0"
