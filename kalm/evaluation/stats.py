"""Success rates over seeds, paired differences, and their confidence intervals.

Pure Python on plain data (results files written by :func:`kalm.evaluation.evaluate.evaluate`),
so the report can use it without loading a model or an environment.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class LevelResult:
    """Success over seeds for one method on one level (or a paired difference)."""

    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    episodes: int


def level_results(result_files: Sequence[Path]) -> dict[str, LevelResult]:
    """Per level, the success rate over every episode of the files (one per seed), with
    the Wilson interval of the pooled episodes and each seed's own rate."""
    per_level: dict[str, list[tuple[int, int]]] = {}
    for path in result_files:
        for level, r in json.loads(Path(path).read_text())["levels"].items():
            per_level.setdefault(level, []).append((r["successes"], r["episodes"]))
    out = {}
    for level, runs in per_level.items():
        k, n = sum(s for s, _ in runs), sum(e for _, e in runs)
        low, high = wilson_interval(k, n)
        out[level] = LevelResult(k / max(n, 1), low, high, tuple(s / max(e, 1) for s, e in runs), n)
    return out


def paired_differences(treated: Sequence[Path], control: Sequence[Path]) -> dict[str, LevelResult]:
    """``treated - control`` success per level over episodes both ran: the files pair
    up by seed, and within a pair the episodes by level and index (the same plan)."""
    per_level: dict[str, list[tuple[bool, bool]]] = {}
    per_seed: dict[str, list[float]] = {}
    for t_path, c_path in zip(treated, control, strict=True):
        for level, rows in _paired_episodes(Path(t_path), Path(c_path)).items():
            per_level.setdefault(level, []).extend(rows)
            per_seed.setdefault(level, []).append(sum(a - b for a, b in rows) / len(rows))
    out = {}
    for level, rows in per_level.items():
        mean, low, high = paired_difference([a for a, _ in rows], [b for _, b in rows])
        out[level] = LevelResult(mean, low, high, tuple(per_seed[level]), len(rows))
    return out


def _paired_episodes(t_path: Path, c_path: Path) -> dict[str, list[tuple[bool, bool]]]:
    """``{level: [(treated success, control success), ...]}`` for two runs of one plan."""
    t_run, c_run = json.loads(t_path.read_text()), json.loads(c_path.read_text())
    if t_run.get("seed") != c_run.get("seed"):
        raise ValueError(f"{t_path} and {c_path} ran different evaluation plans "
                         f"(seeds {t_run.get('seed')} and {c_run.get('seed')}); cannot pair them")
    control_by_key = {(r["level"], r["index"]): r for r in c_run["results"]}
    pairs: dict[str, list[tuple[bool, bool]]] = {}
    for r in t_run["results"]:
        other = control_by_key.get((r["level"], r["index"]))
        if other is None or other["instruction"] != r["instruction"]:
            raise ValueError(f"{t_path} and {c_path} did not run the same episodes; cannot pair them")
        pairs.setdefault(r["level"], []).append((bool(r["success"]), bool(other["success"])))
    return pairs
