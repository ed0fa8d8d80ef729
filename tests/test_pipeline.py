"""The whole KALM pipeline end to end with a tiny model, and its stage caching."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from kalm.cli import app
from kalm.data.hindsight import HindsightConfig
from kalm.evaluation.stats import paired_differences
from kalm.pipeline import PRESETS, LevelPlan, check_config, load_config, run_pipeline
from kalm.pipeline.cache import StageCache
from kalm.pipeline.experiment import acting_for
from kalm.pipeline.stages import ground_stage


@pytest.fixture(scope="module")
def tiny_llm(tiny_backbone) -> str:
    return str(tiny_backbone)


def test_tiny_pipeline_runs_end_to_end_and_reuses_its_stages(tiny_llm, tmp_path, monkeypatch):
    import kalm.pipeline.stages

    tiny = PRESETS["clevr-tiny"]()
    config = replace(tiny, llm=tiny_llm, seeds=(0, 1), algos=("bcq", "dt"),
                     levels={**tiny.levels, "rephrase": LevelPlan(max_steps=2), "easy": LevelPlan(temperature=1.0)},
                     hindsight=HindsightConfig(episodes=20, expert_share=0.0, chunk_size=10),
                     grounding=replace(tiny.grounding, hindsight_share=0.25))
    monkeypatch.setattr(kalm.pipeline.stages, "free_cores", lambda: 2)  # the policies train in two worker processes
    report = run_pipeline(config, tmp_path)
    text = report.read_text()
    for method in ("baseline", "KALM", "imagined without LLM", "LLM as policy"):
        assert method in text
    for level in ("seen", "rephrase", "easy", "hard"):
        assert f"| {level} |" in text
    assert (tmp_path / "report.html").exists() and (tmp_path / "report_files" / "success.png").exists()
    # the algorithm table: each algorithm with and without the same imagined files
    table = text.split("## Offline-RL algorithms with and without KALM")[1].split("##")[0]
    for algo, acting in (("BC", "sampled, T = 3"), ("BCQ", "greedy, ε = 0.1"), ("Decision Transformer", "sampled")):
        for row in ("baseline", "KALM", "KALM − baseline (paired)"):
            assert any(line.startswith(f"| {algo} | {acting}") and f" | {row} | " in line for line in table.splitlines())
    assert "Best algorithm + KALM per level: seen " in table
    assert (tmp_path / "report_files" / "algorithms.png").exists()
    times = text.split("## Stage times")[1].split("##")[0]
    assert "| train-kalm-bcq |" in times and "| train-baseline-dt |" in times
    assert "BCQ greedy, ε = 0.1" in text.split("## Notes")[1]
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "stages").iterdir() if not p.name.startswith("."))
    assert "collect" in stages and "ground" in stages and "imagine-hard" in stages and "showcase" in stages
    assert "hindsight" in stages and "embeddings" in stages and "| embeddings |" in times

    def stage(prefix):
        (path,) = (tmp_path / "stages").glob(f"{prefix}-*")
        return json.loads((path / "stage.json").read_text())["config"], path

    def plan(prefix):
        results = json.loads((stage(prefix)[1] / "results.json").read_text())["results"]
        return [(r["instruction"], r["level"]) for r in results]

    # the per-level cap and temperature reach only their level
    assert stage("imagine-rephrase")[0]["generation"]["max_steps"] == 2
    assert stage("imagine-easy")[0]["generation"]["max_steps"] == config.imagine.generation.max_steps
    assert stage("imagine-easy")[0]["generation"]["temperature"] == 1.0
    assert stage("imagine-rephrase")[0]["generation"]["temperature"] == config.imagine.generation.temperature == 0.0
    # paired within a training seed, a fresh draw of episodes across seeds
    assert stage("evaluate-baseline-s1")[0]["seed"] == config.eval_seed + 1
    assert plan("evaluate-baseline-s0") == plan("evaluate-kalm-s0") != plan("evaluate-baseline-s1")
    # the paired column: KALM minus baseline over the episodes both ran
    outcomes = {m: [r["success"] for s in (0, 1) for r in json.loads(
        (stage(f"evaluate-{m}-s{s}")[1] / "results.json").read_text())["results"] if r["level"] == "seen"]
        for m in ("kalm", "baseline")}
    seen_diff = sum(outcomes["kalm"]) / len(outcomes["kalm"]) - sum(outcomes["baseline"]) / len(outcomes["baseline"])
    assert "KALM − baseline (paired)" in text and "KALM − imagined without LLM (paired)" in text
    assert f"{100 * seen_diff:+.1f} [" in next(line for line in text.splitlines() if line.startswith("| seen |"))

    imagined_rows = text.split("## Imagined rollouts")[1].split("##")[0]
    rows = [line.split("|")[1].strip() for line in imagined_rows.splitlines() if line.startswith("| ")][1:]
    assert rows == [*config.levels, *(f"{level} (no LLM)" for level in config.levels)]  # in the run's order
    # the report is rebuilt from the run directory alone, to the byte
    written = {name: (tmp_path / name).read_bytes() for name in ("report.md", "report.html")}
    for name in written:
        (tmp_path / name).unlink()
    shutil.rmtree(tmp_path / "report_files")
    result = CliRunner().invoke(app, ["report", "--run", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert {name: (tmp_path / name).read_bytes() for name in written} == written
    assert (tmp_path / "report_files" / "showcase_0.gif").exists()

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    run_pipeline(config, tmp_path)  # everything cached: nothing is rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()} == before

    grounded = next((tmp_path / "stages").glob("ground-*"))
    _check_adopting_a_grounded_model(config, grounded, tmp_path / "adopt")

    changed = replace(config, train=replace(config.train, steps=30))
    monkeypatch.setattr(kalm.pipeline.stages, "free_cores", lambda: 1)  # now one after another, in this process
    run_pipeline(changed, tmp_path)  # only policy training and what follows is redone
    new = {p.name for p in (tmp_path / "stages").iterdir()} - set(before)
    # the ablation imagines with the baseline's first policy, so its rollouts (and the
    # instructions the policies meet) follow it
    assert new and all(n.startswith(("train-", "evaluate-baseline", "evaluate-kalm", "evaluate-no-llm",
                                     "imagine-no-llm-", "embeddings-", "showcase")) for n in new)
    assert sum(n.startswith(("train-", "evaluate-")) for n in new) == 12 + 16  # + BCQ and DT, with and without
    assert sum(n.startswith("imagine-no-llm-") for n in new) == len(config.levels)


def test_paired_differences_refuse_runs_of_different_episodes(tmp_path):
    def run(name, instruction, success):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"results": [{"level": "seen", "index": 0, "instruction": instruction,
                                                 "success": success}]}))
        return path

    same = paired_differences([run("a", "push red left", True)], [run("b", "push red left", False)])
    assert same["seen"].mean == 1.0 and same["seen"].episodes == 1
    with pytest.raises(ValueError, match="did not run the same episodes"):
        paired_differences([run("c", "push red left", True)], [run("d", "push blue left", True)])
    other_plan = run("e", "push red left", True)
    other_plan.write_text(json.dumps({**json.loads(other_plan.read_text()), "seed": 7}))
    with pytest.raises(ValueError, match="different evaluation plans"):
        paired_differences([other_plan], [run("f", "push red left", True)])


def test_every_clevr_preset_is_a_valid_config():
    for name in PRESETS:
        config = load_config(name)
        if config.env == "clevr":
            assert check_config(config).name == "clevr"
    gpu, default = load_config("clevr-gpu"), load_config("clevr-default")
    assert gpu.grounding.steps * gpu.grounding.batch_tokens >= 10 * default.grounding.steps * default.grounding.batch_tokens
    assert (gpu.train, gpu.seeds, gpu.levels) == (default.train, default.seeds, default.levels)


def test_config_files_override_the_default_and_refuse_unknown_fields(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"seeds": [4], "train": {"steps": 123}}))
    config = load_config(str(good))
    assert config.seeds == (4,) and config.train.steps == 123 and config.train.algo == "bc"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 1}}))
    with pytest.raises(ValueError, match="unknown field 'stepz'"):
        load_config(str(bad))
    with pytest.raises(ValueError, match="not a preset"):
        load_config("clevr-huge")
    both = tmp_path / "hindsight.json"
    both.write_text(json.dumps({"hindsight": {"episodes": 500}, "grounding": {"hindsight_share": 0.3}}))
    config = load_config(str(both))
    assert config.hindsight.episodes == 500 and config.grounding.hindsight_share == 0.3
    with pytest.raises(ValueError, match=r"hindsight_share.*needs hindsight episodes"):
        check_config(replace(config, hindsight=HindsightConfig(episodes=0)))
    with pytest.raises(ValueError, match=r"'hindsight'.*expert_share"):
        check_config(replace(config, hindsight=HindsightConfig(episodes=5, expert_share=2.0)))
    # policies with an action distribution sample; Q-learners act epsilon-greedily
    cql = load_config(str(good))
    cql = replace(cql, train=replace(cql.train, algo="cql"))
    spec = check_config(cql)
    assert acting_for(cql, spec) == {"temperature": 0.0, "epsilon": 0.1}
    assert acting_for(cql, spec, "dt") == acting_for(config, spec) == {"temperature": 3.0}
    assert acting_for(replace(cql, eval_epsilon=0.0), spec) == {"temperature": 0.0}
    with pytest.raises(ValueError, match=r"'eval_temperature'.*>= 0"):
        check_config(replace(config, eval_temperature=-1.0))
    with pytest.raises(ValueError, match=r"'eval_epsilon'"):
        check_config(replace(config, eval_epsilon=1.5))
    with pytest.raises(ValueError, match=r"'algos'.*'td3plusbc' is not available for clevr"):
        check_config(replace(config, algos=("td3plusbc",)))
    with pytest.raises(ValueError, match=r"'algos': each algorithm once"):
        check_config(replace(config, algos=("cql", "bc")))
    # the paper's Table 3 preset: its batch sizes and learning rates, 1:1 pooled mixing
    paper = load_config("clevr-paper-hparams")
    assert paper.train.hyperparameters == "paper" and paper.train.imaginary_ratio == 0.5
    assert paper.algos == load_config("clevr-algos").algos == ("cql", "bcq", "dt")
    # clevr-full: more data and steps, every other stage as in the default, a growth curve
    full, default = load_config("clevr-full"), load_config("clevr-default")
    assert full.collect.episodes == 4 * default.collect.episodes and full.grounding.steps == 3 * default.grounding.steps
    assert full.grounding.measure_at and max(full.grounding.measure_at) < full.grounding.steps
    assert (full.imagine, full.levels, full.train, full.seeds) == (default.imagine, default.levels, default.train,
                                                                  default.seeds)
    check_config(full)


def _check_adopting_a_grounded_model(config, grounded, out):
    """A model grounded elsewhere (``grounded_model``) becomes the ground stage: copied
    byte for byte, its metrics as the stage summary, keyed by content."""
    adopted = replace(config, grounded_model=str(grounded / "model"), llm="no/such/model")
    spec = check_config(adopted)  # llm is not consulted when a grounded model is given
    stage = ground_stage(StageCache(out), spec, adopted, real=None)
    files = sorted(p.relative_to(grounded / "model") for p in (grounded / "model").rglob("*") if p.is_file())
    assert files and all((stage.path / "model" / f).read_bytes() == (grounded / "model" / f).read_bytes()
                         for f in files)
    summary = json.loads((stage.path / "stage.json").read_text())["summary"]
    assert summary["steps"] == json.loads((grounded / "metrics.json").read_text())["steps"]
    assert ground_stage(StageCache(out), spec, adopted, real=None).cached

    with pytest.raises(ValueError, match=r"grounded_model.*not a grounded model directory"):
        check_config(replace(config, grounded_model=str(out / "missing")))
    meta = json.loads((grounded / "model" / "grounding_config.json").read_text())
    foreign = out / "foreign"
    foreign.mkdir()
    (foreign / "grounding_config.json").write_text(json.dumps({**meta, "state_dim": 39}))
    with pytest.raises(ValueError, match=r"grounded_model.*state_dim 39"):
        check_config(replace(config, grounded_model=str(foreign)))


def test_level_plans_are_overridden_field_by_field_added_and_dropped(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"levels": {"rephrase": {"n": 100}, "easy": None}}))
    config = load_config(str(path))
    default = load_config("clevr-default")
    assert list(config.levels) == ["rephrase", "hard"]
    assert config.levels["rephrase"] == replace(default.levels["rephrase"], n=100)
    assert config.levels["hard"] == default.levels["hard"]
    resolved = config.levels["rephrase"].imagine_config(config.imagine, "rephrase")
    assert (resolved.level, resolved.n, resolved.starts_per_instruction, resolved.generation.max_steps,
            resolved.generation.temperature) == ("rephrase", 100, 6, 3, 1.0)
    # a plan's unset fields take the shared imagine settings; compose adds to them
    plain = LevelPlan().imagine_config(config.imagine, "easy")
    assert (plain.n, plain.generation, plain.compose) == (config.imagine.n, config.imagine.generation, False)
    assert LevelPlan(compose=True).imagine_config(config.imagine, "hard").compose
    path.write_text(json.dumps({"levels": {"rephrase": {"n": 0}}}))
    with pytest.raises(ValueError, match=r"levels\.rephrase: n must be a whole number >= 1"):
        load_config(str(path))


def test_the_report_module_loads_no_model_or_learning_code():
    """``kalm report`` runs where only the run directory is: the report reads files."""
    code = "import sys, kalm.report; print(sorted(m for m in ('torch', 'transformers', 'd3rlpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_baseline_is_named_without_the_imagined_share_it_never_draws():
    """Trying another imagined share retrains KALM and reuses the baseline."""
    from kalm.offline.config import TrainConfig
    from kalm.pipeline.stages import train_key

    quarter, half = TrainConfig(imaginary_ratio=0.25), TrainConfig(imaginary_ratio=0.5, imaginary_mix="per_source")
    assert train_key(quarter, []) == train_key(half, [])
    assert train_key(quarter, ["imagine-easy"]) != train_key(half, ["imagine-easy"])
    assert train_key(quarter, []) != train_key(TrainConfig(imaginary_ratio=0.25, steps=7), [])
