"""The run report: success tables with confidence intervals, plots and rollout GIFs.

Built from a run directory alone (:func:`write_report`): the ``run.json`` that ``kalm
run`` writes names the stage directories of the run, and everything shown is read from
the plain files those stages wrote (JSON results and summaries, training curves, the
showcase GIFs). It never loads a model or an environment, so ``kalm report`` can
rebuild a report anywhere the run directory is. Writes ``report.md`` and a
self-contained-enough ``report.html`` (images beside it in ``report_files/``), both
atomically.
"""

from __future__ import annotations

import html
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from kalm.evaluation.stats import LevelResult, level_results, paired_differences
from kalm.files import read_curve, read_json, write_text_atomic

LEVELS = ("seen", "rephrase", "easy", "hard")


@dataclass(frozen=True)
class Showcase:
    """An imagined rollout beside the trained policy's real execution of the same
    instruction from the same start, drawn as one GIF by the showcase stage."""

    instruction: str
    gif: Path
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
    # the grounding's held-out figures at several steps (GroundingConfig.measure_at)
    grounding_growth: Sequence[Mapping[str, float]] = ()
    timings: Mapping[str, float] = field(default_factory=dict)
    showcases: Sequence[Showcase] = ()
    notes: Sequence[str] = ()
    # algorithm -> {"baseline", "KALM", "KALM - baseline"} -> level -> result, when a run
    # compared several offline-RL algorithms on the same data
    algorithms: Mapping[str, Mapping[str, Mapping[str, LevelResult]]] = field(default_factory=dict)
    acting: Mapping[str, str] = field(default_factory=dict)  # algorithm -> how its policies act
    llm_acting: str = "greedy"  # how the LLM acts as a policy


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


ALGO_LABELS = {"bc": "BC", "cql": "CQL", "bcq": "BCQ", "iql": "IQL", "awac": "AWAC", "td3plusbc": "TD3+BC",
               "dt": "Decision Transformer"}
_ALGO_ROWS = ("baseline", "KALM", "KALM − baseline")


def _cell(r: LevelResult | None, signed: bool = False) -> str:
    if r is None:
        return "–"
    f = _signed if signed else _pct
    return f"{f(r.mean)}{'' if signed else ' %'} [{f(r.low)}, {f(r.high)}]"


def algorithm_table(inputs: ReportInputs) -> str:
    """Every algorithm with and without the imagined data, and the paired difference,
    per level; then the LLM itself as a policy."""
    rows = ["| algorithm | acting | policy | " + " | ".join(LEVELS) + " |", "|---|---|---|" + "---|" * len(LEVELS)]
    for algo, results in inputs.algorithms.items():
        for row in _ALGO_ROWS:
            cells = [_cell(results[row].get(level), signed=row == "KALM − baseline") for level in LEVELS]
            label = row + (" (paired)" if row == "KALM − baseline" else "")
            rows.append(f"| {ALGO_LABELS.get(algo, algo)} | {inputs.acting.get(algo, '')} | {label} | "
                        + " | ".join(cells) + " |")
    llm = inputs.results.get(METHOD_LABELS["llm-policy"])
    if llm:
        rows.append(f"| LLM as policy | {inputs.llm_acting} | – | "
                    + " | ".join(_cell(llm.get(level)) for level in LEVELS) + " |")
    return "\n".join(rows)


def best_with_kalm(inputs: ReportInputs) -> dict[str, tuple[str, LevelResult]]:
    """Per level, the algorithm whose KALM policy succeeded most often."""
    best = {}
    for level in LEVELS:
        scored = [(algo, r["KALM"][level]) for algo, r in inputs.algorithms.items() if level in r["KALM"]]
        if scored:
            best[level] = max(scored, key=lambda item: item[1].mean)
    return best


def _algorithm_plot(inputs: ReportInputs, path: Path) -> None:
    """One panel per level: each algorithm's baseline and KALM bars side by side."""
    algos = list(inputs.algorithms)
    fig, axes = plt.subplots(1, len(LEVELS), figsize=(3.0 * len(LEVELS), 3.4), sharey=True)
    x = np.arange(len(algos))
    for ax, level in zip(axes, LEVELS):
        for i, row in enumerate(("baseline", "KALM")):
            res = [inputs.algorithms[a][row].get(level) for a in algos]
            means = np.array([r.mean if r else np.nan for r in res])
            err = np.array([[r.mean - r.low, r.high - r.mean] if r else [0, 0] for r in res]).T
            ax.bar(x + (i - 0.5) * 0.4, 100 * means, 0.4, yerr=100 * err, capsize=2, label=row, color=f"C{i}")
        ax.set_xticks(x, [ALGO_LABELS.get(a, a).replace("Decision Transformer", "DT") for a in algos], fontsize=8)
        ax.set_title(level)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("success rate (%)")
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle("offline-RL algorithms with and without KALM's imagined rollouts (95 % CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hallucination_table(inputs: ReportInputs) -> str:
    if not inputs.hallucination:
        return ""
    checks = sorted({c for s in inputs.hallucination.values() for c in s["hallucination"]["transition_share"]})
    head = ("| level | rollouts | reach goal | reach goal on replay | dropped: implausible / fragile | kept | "
            "kept and real on replay | " + " | ".join(f"{c} (transitions)" for c in checks)
            + " |\n|---|---|---|---|---|---|---|" + "---|" * len(checks))
    rows = []
    for level, s in inputs.hallucination.items():
        shares, counts = s["hallucination"]["transition_share"], s["counts"]
        rows.append(
            f"| {level} | {counts['generated']} | {_pct(s['success_share'])} % | "
            f"{_replay(s.get('replay_generated'))} | "
            f"{counts.get('dropped_physics', 0)} / {counts.get('dropped_fragile', 0)} | {counts['kept']} | "
            f"{_replay(s.get('replay'))} | " + " | ".join(f"{_pct(shares.get(c, 0.0))} %" for c in checks) + " |"
        )
    return head + "\n" + "\n".join(rows)


# (metric, what it measures, measuring stick metric or None, what the stick is), in report order
_GROUNDING_ROWS = (
    ("dynamics_mse", "Dynamics: mean squared error of the next state", "copy_baseline_mse",
     "predicting no change"),
    ("dynamics_median_l2", "Dynamics: median L2 error of the next state", "mlp_dynamics_median_l2",
     "a plain MLP on the same transitions"),
    ("explanation_accuracy", "Explanation of held-out expert episodes: the exact task",
     "explanation_chance_among_achieved", "a random pick among the tasks achieved"),
    ("explanation_equivalent", "Explanation of held-out expert episodes: the same goal",
     "explanation_equivalent_chance_among_achieved", "a random pick among the goals achieved"),
    ("explanation_achieved", "Explanation of held-out expert episodes: a goal the trajectory achieved", None, ""),
    ("determined_explanation_equivalent",
     "Explanation of held-out trajectories that achieved exactly one goal: that goal",
     "determined_explanation_chance", "naming at random one training goal its scene holds"),
    ("generation_success", "Generation from held-out starts and phrasings: reaches the goal in imagination", None,
     ""),
)
_PERCENT_METRICS = {"explanation_accuracy", "explanation_chance_among_achieved", "explanation_equivalent",
                    "explanation_equivalent_chance_among_achieved", "explanation_achieved",
                    "determined_explanation_equivalent", "determined_explanation_chance", "generation_success"}


def _grounding_value(metrics: Mapping[str, float], key: str | None) -> str:
    if key is None or key not in metrics:
        return "–"
    value = metrics[key]
    return f"{_pct(value)} %" if key in _PERCENT_METRICS else f"{value:.4g}"


def grounding_table(metrics: Mapping[str, float]) -> str:
    """The grounded LLM's held-out measures, each beside what it should beat."""
    rows = ["| measure | grounded LLM | measuring stick |", "|---|---|---|"]
    for key, label, stick, stick_label in _GROUNDING_ROWS:
        if key in metrics:
            beside = f"{_grounding_value(metrics, stick)} ({stick_label})" if stick in metrics else "–"
            rows.append(f"| {label} | {_grounding_value(metrics, key)} | {beside} |")
    details = [f"{metrics[k]:g} {label}" for k, label in (
        ("steps", "steps"), ("train_seconds", "s training"), ("tokens_per_second", "tokens/s"),
        ("train_episodes", "expert episodes"), ("hindsight_train_episodes", "hindsight episodes"),
        ("eval_seconds", "s evaluating")) if metrics.get(k)]
    return "\n".join(rows) + ("\n\n" + ", ".join(details) + "." if details else "")


# growth columns: (metric, short label); percentages but for the dynamics error
_GROWTH_COLUMNS = (("dynamics_median_l2", "dynamics median L2"),
                   ("explanation_equivalent", "explanation, expert: same goal"),
                   ("explanation_achieved", "explanation, expert: achieved"),
                   ("determined_explanation_equivalent", "explanation, determined"),
                   ("generation_success", "generation reaches goal"))


def growth_table(growth: Sequence[Mapping[str, float]]) -> str:
    """The grounding's held-out figures after each measured number of steps."""
    columns = [(k, label) for k, label in _GROWTH_COLUMNS if any(k in row for row in growth)]
    rows = ["| steps | " + " | ".join(label for _, label in columns) + " |",
            "|---|" + "---|" * len(columns)]
    for row in growth:
        rows.append(f"| {row['step']:g} | " + " | ".join(_grounding_value(row, k) for k, _ in columns) + " |")
    return "\n".join(rows)


def _growth_plot(growth: Sequence[Mapping[str, float]], path: Path) -> None:
    """Percent figures on the left axis, the dynamics error on the right, against steps."""
    steps = [row["step"] for row in growth]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for key, label in _GROWTH_COLUMNS[1:]:
        if all(key in row for row in growth):
            ax.plot(steps, [100 * row[key] for row in growth], marker="o", label=label)
    ax.set_xlabel("grounding step")
    ax.set_ylabel("held-out share (%)")
    ax.set_ylim(bottom=0)
    if all("dynamics_median_l2" in row for row in growth):
        right = ax.twinx()
        right.plot(steps, [row["dynamics_median_l2"] for row in growth], color="k", ls="--", marker="s",
                   label="dynamics median L2 (right)")
        right.set_ylabel("dynamics median L2")
        right.set_ylim(bottom=0)
        right.legend(frameon=False, fontsize=7, loc="upper right")
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def write_report(run_dir: str | os.PathLike) -> Path:
    """Build the report of the run in ``run_dir`` from its files; returns ``report.md``."""
    run_dir = Path(run_dir)
    return render_report(run_dir, read_run(run_dir))


def read_run(run_dir: str | os.PathLike) -> ReportInputs:
    """What the report shows, read from the ``run.json`` manifest and the stage files
    it names (a missing or damaged file is refused, naming it)."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "run.json", "run manifest (written by `kalm run` when it finishes)")
    stages = run_dir / "stages"
    names = manifest["stages"]

    def record(name: str) -> dict:
        return read_json(stages / name / "stage.json", "stage record")

    methods = list(names["evaluate"])  # baseline, kalm and, with the ablation, no-llm
    results_files = {m: [stages / n / "results.json" for n in names["evaluate"][m]] for m in methods}
    curves = {}
    for method in methods:
        for seed, name in zip(manifest["seeds"], names["train"][method]):
            curves[f"{METHOD_LABELS[method]} seed {seed}"] = read_curve(stages / name / "policy" / "curve.csv")
    imagined = dict(names["imagine"])
    without_llm = dict(names.get("imagine-no-llm") or [])
    compared = names.get("algorithms") or {}
    algorithms = {}
    if len(compared) > 1:
        for algo, stage_names in compared.items():
            files = {row: [stages / n / "results.json" for n in stage_names[row]] for row in ("baseline", "kalm")}
            algorithms[algo] = {"baseline": level_results(files["baseline"]), "KALM": level_results(files["kalm"]),
                                "KALM − baseline": paired_differences(files["kalm"], files["baseline"])}
    used = [names["collect"], *([names["hindsight"]] if names.get("hindsight") else []), names["ground"],
            *imagined.values(), *without_llm.values(), *([names["dynamics-mlp"]] if names.get("dynamics-mlp") else []),
            *([names["embeddings"]] if names.get("embeddings") else []),
            *(n for m in methods for n in names["train"][m]), *(n for m in methods for n in names["evaluate"][m]),
            *{n for rows in compared.values() for stage_names in rows.values() for n in stage_names},
            names["llm-policy"], names["showcase"]]
    showcase_dir = stages / names["showcase"]
    showcases = [Showcase(row["instruction"], showcase_dir / row["gif"], row["real_success"], row["imagined_success"])
                 for row in read_json(showcase_dir / "showcase.json", "showcase")]
    return ReportInputs(
        title=manifest["title"],
        algo=manifest["algo"],
        results={**{METHOD_LABELS[m]: level_results(results_files[m]) for m in methods},
                 METHOD_LABELS["llm-policy"]: level_results([stages / names["llm-policy"] / "results.json"])},
        differences={f"{METHOD_LABELS[a]} − {METHOD_LABELS[b]}": paired_differences(results_files[a], results_files[b])
                     for a, b in _COMPARED if a in results_files and b in results_files},
        curves=curves,
        hallucination={**{level: record(name)["summary"] for level, name in imagined.items()},
                       **{f"{level} (no LLM)": record(name)["summary"] for level, name in without_llm.items()}},
        grounding={k: v for k, v in record(names["ground"])["summary"].items() if isinstance(v, (int, float))},
        grounding_growth=tuple(record(names["ground"])["summary"].get("growth") or ()),
        timings=_stage_times(record(name) for name in sorted(used)),
        showcases=showcases,
        notes=_notes(manifest, run_dir),
        algorithms=algorithms,
        acting={algo: _acting_label(how) for algo, how in (manifest.get("acting") or {}).items()},
        llm_acting=_acting_label(manifest.get("llm_policy_acting") or {}),
    )


def _acting_label(how: Mapping[str, float]) -> str:
    held = f", each action held {how['every']:g} steps" if how.get("every", 1) > 1 else ""
    if how.get("temperature"):
        return f"sampled, T = {how['temperature']:g}{held}"
    if how.get("epsilon"):
        return f"greedy, ε = {how['epsilon']:g}{held}"
    return f"greedy{held}"


# What each policy row is, in the words the report uses.
METHOD_LABELS = {"baseline": "baseline", "kalm": "KALM", "no-llm": "imagined without LLM",
                 "llm-policy": "LLM as policy"}
# The paired comparisons shown: KALM and the ablation against the baseline, and KALM
# against the ablation (what the LLM adds).
_COMPARED = (("kalm", "baseline"), ("no-llm", "baseline"), ("kalm", "no-llm"))


def _stage_times(records) -> dict[str, float]:
    """Seconds per stage, the seeds of a training or evaluation stage added up."""
    timings: dict[str, float] = {}
    for record in records:
        stage = record["stage"]
        group = stage.split("-s")[0] if stage.startswith(("train", "evaluate")) else stage
        timings[group] = timings.get(group, 0.0) + float(record["seconds"])
    return timings


def _acting(manifest: Mapping) -> str:
    """How the run's trained policies act, per algorithm (runs before per-algorithm
    acting recorded one temperature for all)."""
    one_for_all = {manifest.get("algo", "bc"): {"temperature": manifest.get("eval_temperature", 0)}}
    acting = manifest.get("acting") or one_for_all
    ways = "; ".join(f"{ALGO_LABELS.get(algo, algo)} {_acting_label(how)}" for algo, how in acting.items())
    llm = _acting_label(manifest.get("llm_policy_acting") or {})
    return (f"How trained policies act, the same for every method's policy of an algorithm: {ways} (sampled: drawn "
            f"from the policy's own action distribution; ε: that share of random actions). The LLM policy: {llm}.")


def _notes(manifest: Mapping, run_dir: Path) -> list[str]:
    notes = [f"{len(manifest['seeds'])} seeds x {manifest['eval_episodes']} episodes per level for each policy (each "
             "seed its own episodes, the same for every method's policy of that seed); "
             f"the LLM policy: {manifest['llm_policy_episodes']} episodes per level.",
             _acting(manifest),
             f"Resolved config: {run_dir / 'config.json'}"]
    if manifest.get("grounded_model"):
        notes.append(f"Grounding was not trained in this run: the model was adopted from {manifest['grounded_model']}.")
    return notes


def render_report(out_dir: str | os.PathLike, inputs: ReportInputs) -> Path:
    """Write ``report.md`` and ``report.html`` (+ ``report_files/``) into ``out_dir``."""
    out = Path(out_dir)
    files = out / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    _bar_plot(inputs, files / "success.png")
    if inputs.algorithms:
        _algorithm_plot(inputs, files / "algorithms.png")
    has_curves = _curve_plot(inputs, files / "curves.png")
    if len(inputs.grounding_growth) > 1:
        _growth_plot(inputs.grounding_growth, files / "growth.png")
    gifs = []
    for i, show in enumerate(inputs.showcases):
        shutil.copyfile(show.gif, files / f"showcase_{i}.gif")
        gifs.append((f"report_files/showcase_{i}.gif", show))
    text = "\n".join(_markdown(inputs, has_curves, gifs))
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.html", _markdown_to_html(text, inputs.title))
    return out / "report.md"


def _markdown(inputs: ReportInputs, has_curves: bool, gifs: Sequence[tuple[str, Showcase]]) -> list[str]:
    md = [f"# {inputs.title}", "", f"Offline RL algorithm: **{inputs.algo}**. Success rate in the real simulator, "
          "mean over seeds with a 95 % confidence interval (Wilson, all episodes pooled). A *paired* column "
          "is the difference in percentage points over the episodes both policies ran (the same instructions "
          "and starts for the same seed), with a 95 % interval on the per-episode differences.", "",
          success_table(inputs), "", "![success](report_files/success.png)", ""]
    if inputs.algorithms:
        best = best_with_kalm(inputs)
        md += ["## Offline-RL algorithms with and without KALM", "",
               "Each algorithm trained on the real data alone (baseline) and on real + the same imagined files "
               "(KALM), with the same seeds, evaluated on the same episodes. BCQ is discrete BCQ, d3rlpy's "
               "policy-constrained Q-learner for discrete actions, standing in for AWAC and IQL (d3rlpy has "
               "them for continuous actions only).", "", algorithm_table(inputs), "",
               "Best algorithm + KALM per level: " + "; ".join(
                   f"{level} {ALGO_LABELS.get(algo, algo)} ({_pct(r.mean)} %)" for level, (algo, r) in best.items())
               + ".", "", "![algorithms](report_files/algorithms.png)", ""]
    if inputs.grounding:
        md += ["## Grounding", "", grounding_table(inputs.grounding), ""]
    if len(inputs.grounding_growth) > 1:
        md += ["### How the grounding grows with steps", "", "The held-out figures above, measured on the same "
               "episodes while the model trained.", "", growth_table(inputs.grounding_growth), "",
               "![growth](report_files/growth.png)", ""]
    if inputs.hallucination:
        md += ["## Imagined rollouts", "", hallucination_table(inputs), "",
               "*Reach goal*: the task's predicate holds on an imagined state. *Reach goal on replay*: a generated "
               "rollout's actions, kept or not, reach the goal when executed from its start in the real simulator "
               "(evenly spaced, at most 2,000 per level). *Kept and real on replay*: the "
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
    return md


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
        elif line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
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
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", escaped)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", escaped)
