"""Imaginary rollouts: the grounded LLM writes trajectories for new instructions."""
