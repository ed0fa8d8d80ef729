"""Offline RL from episode files: instruction encoder, d3rlpy training, policy loading.

``kalm.offline`` depends on ``kalm.envs`` and ``kalm.data`` only; it never imports
grounding or imagination code (imaginary episodes arrive as ordinary episode files).
"""
