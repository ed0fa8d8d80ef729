"""Confidence intervals for success rates."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion.

    Chosen over the normal approximation because evaluation rates sit near 0 or 1 with
    a few hundred episodes, where the normal interval collapses to a point or leaves
    [0, 1]; Wilson's stays inside and keeps close to its nominal coverage there.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (low, high)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = Z95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired episodes, with a 95 % interval.

    Why paired: the baseline and KALM policies of one seed run the same episodes (same
    instruction, same start), so the difference of their success rates has a much
    smaller variance than two independent rates, where much of the spread is which
    instructions happened to be drawn. The interval is the normal one on the per-episode
    differences (each -1, 0 or 1), sound with the hundreds of pairs per level a run has.
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return (0.0, -1.0, 1.0)
    d = [float(x) - float(y) for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    if n == 1:
        return (mean, -1.0, 1.0)
    half = z * statistics.stdev(d, mean) / math.sqrt(n)
    return (mean, max(-1.0, mean - half), min(1.0, mean + half))
