"""The run report: success tables with confidence intervals, plots and rollout GIFs.

Reads only plain data that the pipeline stages wrote (JSON results, training curves,
state arrays); it never loads a model. Writes ``report.md`` and a self-contained-
enough ``report.html`` (images beside it in ``report_files/``), both atomically.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from kalm.envs.spec import EnvSpec
from kalm.files import write_atomic, write_text_atomic

LEVELS = ("seen", "rephrase", "easy", "hard")


@dataclass(frozen=True)
class LevelResult:
    """Success over seeds for one method on one level."""

    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    episodes: int


@dataclass(frozen=True)
class Showcase:
    """An imagined rollout and the trained policy's real execution of the same
    instruction from the same start."""

    instruction: str
    imagined: np.ndarray
    real: np.ndarray
    real_success: bool
    imagined_success: bool


@dataclass(frozen=True)
class ReportInputs:
    title: str
    algo: str
    results: Mapping[str, Mapping[str, LevelResult]]  # method -> level -> result
    # "a - b" -> level -> the paired difference of success (same episodes, same seeds)
    differences: Mapping[str, Mapping[str, LevelResult]] = field(default_factory=dict)
    curves: Mapping[str, Sequence[Mapping[str, float]]] = field(default_factory=dict)
    hallucination: Mapping[str, Mapping] = field(default_factory=dict)  # level -> imagine summary
    grounding: Mapping[str, float] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    showcases: Sequence[Showcase] = ()
    notes: Sequence[str] = ()


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def success_table(inputs: ReportInputs) -> str:
    methods, diffs = list(inputs.results), list(inputs.differences)
    columns = methods + [f"{d} (paired)" for d in diffs]
    head = "| level | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    rows = []
    for level in LEVELS:
        cells = []
        for m in methods:
            r = inputs.results[m].get(level)
            cells.append("–" if r is None else f"{_pct(r.mean)} % [{_pct(r.low)}, {_pct(r.high)}]")
        for d in diffs:
            r = inputs.differences[d].get(level)
            cells.append("–" if r is None else f"{_signed(r.mean)} [{_signed(r.low)}, {_signed(r.high)}]")
        rows.append(f"| {level} | " + " | ".join(cells) + " |")
    return head + "\n" + "\n".join(rows)


def hallucination_table(inputs: ReportInputs) -> str:
    if not inputs.hallucination:
        return ""
    checks = sorted({c for s in inputs.hallucination.values() for c in s["hallucination"]["transition_share"]})
    head = ("| level | rollouts | reach goal | dropped: implausible / fragile | kept | kept and real on replay | "
            + " | ".join(f"{c} (transitions)" for c in checks) + " |\n|---|---|---|---|---|---|" + "---|" * len(checks))
    rows = []
    for level, s in inputs.hallucination.items():
        shares, counts = s["hallucination"]["transition_share"], s["counts"]
        rows.append(
            f"| {level} | {counts['generated']} | {_pct(s['success_share'])} % | "
            f"{counts.get('dropped_physics', 0)} / {counts.get('dropped_fragile', 0)} | {counts['kept']} | "
            f"{_replay(s.get('replay'))} | " + " | ".join(f"{_pct(shares.get(c, 0.0))} %" for c in checks) + " |"
        )
    return head + "\n" + "\n".join(rows)


def _replay(replay: Mapping | None) -> str:
    """Kept rollouts whose actions, executed from the same start in the simulator, reach
    the goal (an audit of the imagined success labels)."""
    if not replay or replay.get("real_success_share") is None:
        return "n/a"
    return f"{_pct(replay['real_success_share'])} % of {replay['replayed']}"


def _bar_plot(inputs: ReportInputs, path: Path) -> None:
    methods = list(inputs.results)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(LEVELS))
    for i, m in enumerate(methods):
        res = [inputs.results[m].get(level) for level in LEVELS]
        means = np.array([r.mean if r else np.nan for r in res])
        err = np.array([[r.mean - r.low, r.high - r.mean] if r else [0, 0] for r in res]).T
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, 100 * means, width, yerr=100 * err, capsize=3, label=m)
    ax.set_xticks(x, LEVELS)
    ax.set_ylabel("success rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False)
    ax.set_title(f"{inputs.algo}: success per level (95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_plot(inputs: ReportInputs, path: Path) -> bool:
    curves = {k: v for k, v in inputs.curves.items() if v}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.4))
    colours: dict[str, str] = {}
    for name, rows in curves.items():
        # the first loss column; algorithms with delayed updates (TD3+BC's actor) log
        # some losses only on some rows, so plot the rows that have it
        key = next((k for k in rows[0] if k not in ("step", "epoch")), None)
        if key is None:
            continue
        logged = [r for r in rows if r.get(key) is not None]
        steps, losses = np.array([r["step"] for r in logged]), np.array([r[key] for r in logged], dtype=float)
        # A per-step loss is noisy enough that ten seeds drawn raw hide each other; a
        # running mean over 2 % of the run shows the trend, one colour per method.
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        method = name.split(" seed ")[0]
        first = method not in colours
        colours.setdefault(method, f"C{len(colours)}")
        ax.plot(steps[window - 1:], smooth, color=colours[method], lw=1.0, alpha=0.8,
                label=f"{method} ({key}, running mean)" if first else None)
    ax.set_xlabel("gradient step")
    ax.set_ylabel("training loss")
    ax.set_yscale("symlog")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _showcase_gif(spec: EnvSpec, show: Showcase, path: Path) -> None:
    render = spec.render_state
    from PIL import Image

    n = max(len(show.imagined), len(show.real))
    frames = []
    for t in range(n):
        i = min(t, len(show.imagined) - 1)
        left = render(show.imagined[i], 192, f"imagined, step {i}")
        right = render(show.real[min(t, len(show.real) - 1)], 192, f"policy in sim, step {min(t, len(show.real) - 1)}")
        frames.append(np.concatenate([left, np.full((192, 6, 3), 255, np.uint8), right], axis=1))
    images = [Image.fromarray(f) for f in frames]
    write_atomic(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:] or None,
                                                duration=600, loop=0))


def write_report(out_dir: str | os.PathLike, inputs: ReportInputs, spec: EnvSpec) -> Path:
    """Write ``report.md`` and ``report.html`` (+ ``report_files/``) into ``out_dir``."""
    out = Path(out_dir)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    _bar_plot(inputs, files / "success.png")
    has_curves = _curve_plot(inputs, files / "curves.png")
    gifs = []
    for i, show in enumerate(inputs.showcases):
        _showcase_gif(spec, show, files / f"showcase_{i}.gif")
        gifs.append((f"report_files/showcase_{i}.gif", show))

    md = [f"# {inputs.title}", "", f"Offline RL algorithm: **{inputs.algo}**. Success rate in the real simulator, "
          "mean over seeds with a 95 % confidence interval (Wilson, all episodes pooled). A *paired* column "
          "is the difference in percentage points over the episodes both policies ran (the same instructions "
          "and starts for the same seed), with a 95 % interval on the per-episode differences.", "",
          success_table(inputs), "", "![success](report_files/success.png)", ""]
    if inputs.grounding:
        md += ["## Grounding", "", "| metric | value |", "|---|---|"]
        md += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in inputs.grounding.items()]
        md.append("")
    if inputs.hallucination:
        md += ["## Imagined rollouts", "", hallucination_table(inputs), "",
               "*Reach goal*: the task's predicate holds on an imagined state. *Kept and real on replay*: the "
               "kept rollouts' actions executed from the same start in the real simulator reach the goal too "
               "(an audit of the imagined labels; it never feeds training). *Implausible*: a transition "
               "breaks the environment's physics checks; *fragile*: the goal holds on too few noisy "
               "copies of the last imagined state (noise the size of the model's error). Transition shares are "
               "over all imagined transitions.", ""]
    if has_curves:
        md += ["## Training curves", "", "![curves](report_files/curves.png)", ""]
    if gifs:
        md += ["## Imagined vs real", ""]
        for src, show in gifs:
            md += [f"*{show.instruction}* — imagined {'reaches' if show.imagined_success else 'misses'} the goal; "
                   f"the KALM policy {'succeeds' if show.real_success else 'fails'} in the simulator.", "",
                   f"![rollout]({src})", ""]
    if inputs.timings:
        md += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in inputs.timings.items()]
        md.append("")
    if inputs.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in inputs.notes] + [""]
    text = "\n".join(md)
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.html", _markdown_to_html(text, inputs.title))
    return out / "report.md"


def _markdown_to_html(text: str, title: str) -> str:
    """The small subset of Markdown the report uses: headings, tables, images, lists."""
    body, table = [], []

    def flush_table():
        if not table:
            return
        rows = [r.strip().strip("|").split("|") for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
        head, *rest = rows
        body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
                    + "</tr></thead><tbody>" + "".join(
                        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rest)
                    + "</tbody></table>")
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            body.append(f'<p><img alt="{html.escape(alt)}" src="{html.escape(src.rstrip(")"))}"></p>')
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def _inline(text: str) -> str:
    import re

    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", escaped)
