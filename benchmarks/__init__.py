"""Measured performance tables for kalm (``python -m benchmarks``)."""
