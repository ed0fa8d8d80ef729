"""Evaluation results on disk: the full JSON, and a markdown table for people."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kalm.files import write_json_atomic, write_text_atomic


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(reports: Sequence[dict[str, Any]]) -> str:
    """One row per (policy, level) and one indented row per task kind."""
    lines = [
        "| policy | level | kind | episodes | success | 95% CI |",
        "|---|---|---|---:|---:|---|",
    ]
    for report in reports:
        for level, stats in report["levels"].items():
            lines.append(
                f"| {report['policy']} | {level} | all | {stats['episodes']} | {_pct(stats['success_rate'])} "
                f"| {_pct(stats['ci95'][0])}–{_pct(stats['ci95'][1])} |"
            )
            if len(stats["by_kind"]) > 1:
                for kind, k in stats["by_kind"].items():
                    lines.append(
                        f"| | | {kind} | {k['episodes']} | {_pct(k['success_rate'])} "
                        f"| {_pct(k['ci95'][0])}–{_pct(k['ci95'][1])} |"
                    )
    return "\n".join(lines) + "\n"


def write_results(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (JSON) and the same name with ``.md``, each atomically."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"evaluation output must be a .json file (a .md table is written next to it), got {out}")
    json_path = write_json_atomic(out, report)
    header = f"# Evaluation of {report['policy']} on {report['env']} (seed {report['seed']})\n\n"
    md_path = write_text_atomic(out.with_suffix(".md"), header + markdown_table([report]))
    return json_path, md_path


def default_results_path(policy_dir: Path | None, baseline: str | None, level: str, tasks: Path | None, seed: int,
                         epsilon: float = 0.0, temperature: float = 0.0) -> Path:
    """Where ``kalm evaluate`` writes results when not told: beside the policy, in
    ``<policy>/evaluation/``, named by what was evaluated (reference policies under
    ``runs/eval/``)."""
    suffix = ("" if epsilon == 0 else f"-eps{epsilon:g}") + ("" if temperature == 0 else f"-T{temperature:g}")
    name = f"{tasks.stem if tasks is not None else level}-seed{seed}{suffix}.json"
    return (policy_dir / "evaluation" / name) if policy_dir is not None else Path("runs/eval") / f"{baseline}-{name}"
