"""The report renders tables, plots and side-by-side GIFs from plain stage outputs."""

from __future__ import annotations

import numpy as np
from PIL import Image

from kalm.envs import get_spec
from kalm.evaluation.showcase import draw_side_by_side
from kalm.evaluation.stats import LevelResult
from kalm.report import ReportInputs, Showcase, render_report


def test_report_writes_markdown_html_plots_and_gifs(tmp_path):
    spec = get_spec("clevr")
    env = spec.make_env()
    s0, _ = env.reset(seed=0)
    states = np.stack([s0, env.step(3)[0], env.step(11)[0]])
    gif = tmp_path / "stage" / "showcase_0.gif"
    gif.parent.mkdir()
    draw_side_by_side(spec, states, states[:2], gif)
    r = LevelResult(mean=0.5, low=0.4, high=0.6, per_seed=(0.45, 0.55), episodes=200)
    inputs = ReportInputs(
        title="KALM on CLEVR-Robot",
        algo="bc",
        results={"baseline": {"seen": r, "easy": r}, "kalm": {"seen": r, "rephrase": r, "easy": r, "hard": r}},
        differences={"kalm - baseline": {"seen": LevelResult(0.042, 0.002, 0.083, (0.03, 0.05), 200)}},
        curves={"kalm seed 0": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]},
        hallucination={"easy": {"counts": {"generated": 10, "kept": 8}, "success_share": 0.7,
                                "hallucination": {"transition_share": {"too_far": 0.1, "non_finite": 0.0}}}},
        grounding={"dynamics_mse": 0.004, "copy_baseline_mse": 0.006, "explanation_accuracy": 0.03,
                   "explanation_chance_among_achieved": 0.2, "generation_success": 0.06, "steps": 400},
        grounding_growth=[{"step": 100, "dynamics_median_l2": 0.09, "generation_success": 0.02},
                          {"step": 400, "dynamics_median_l2": 0.06, "generation_success": 0.06}],
        timings={"collect": 12.0},
        showcases=[Showcase("Push the red ball left", gif, True, False)],
        notes=["a note"],
    )
    out = tmp_path / "run"
    md = render_report(out, inputs)
    text = md.read_text()
    assert "| seen | 50.0 % [40.0, 60.0] | 50.0 % [40.0, 60.0] | +4.2 [+0.2, +8.3] |" in text
    assert "| rephrase | – |" in text and "| easy | 50.0 % [40.0, 60.0] | 50.0 % [40.0, 60.0] | – |" in text
    assert "| Dynamics: mean squared error of the next state | 0.004 | 0.006 (predicting no change) |" in text
    assert "| Explanation of held-out expert episodes: the exact task | 3.0 % | 20.0 % (a random pick" in text
    assert "reaches the goal in imagination | 6.0 % | – |" in text and "400 steps." in text
    assert "| steps | dynamics median L2 | generation reaches goal |" in text
    assert "| 100 | 0.09 | 2.0 % |" in text and "| 400 | 0.06 | 6.0 % |" in text
    assert Image.open(out / "report_files" / "growth.png").size[0] > 300
    page = (out / "report.html").read_text()
    assert "<table>" in page and "showcase_0.gif" in page and "<h2>Imagined rollouts</h2>" in page
    assert "<h3>How the grounding grows with steps</h3>" in page
    shown = Image.open(out / "report_files" / "showcase_0.gif")
    assert shown.n_frames == 3 and shown.size[0] > 2 * shown.size[1]
    assert Image.open(out / "report_files" / "success.png").size[0] > 300
