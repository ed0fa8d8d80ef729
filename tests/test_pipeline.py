"""The whole KALM pipeline end to end with a tiny model, and its stage caching."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kalm.pipeline import PRESETS, _ground, check_config, load_config, run_pipeline
from kalm.stagecache import StageCache


@pytest.fixture(scope="module")
def tiny_llm(tiny_backbone) -> str:
    return str(tiny_backbone)


def test_tiny_pipeline_runs_end_to_end_and_reuses_its_stages(tiny_llm, tmp_path, monkeypatch):
    import kalm.pipeline

    config = replace(PRESETS["clevr-tiny"](), llm=tiny_llm, seeds=(0, 1), imagine_max_steps=(("rephrase", 2),),
                     imagine_temperature=(("easy", 1.0),))
    monkeypatch.setattr(kalm.pipeline, "free_cores", lambda: 2)  # the policies train in two worker processes
    report = run_pipeline(config, tmp_path)
    text = report.read_text()
    for method in ("baseline", "kalm", "llm-policy"):
        assert method in text
    for level in ("seen", "rephrase", "easy", "hard"):
        assert f"| {level} |" in text
    assert (tmp_path / "report.html").exists() and (tmp_path / "report_files" / "success.png").exists()
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "stages").iterdir() if not p.name.startswith("."))
    assert "collect" in stages and "ground" in stages and "imagine-hard" in stages and "showcase" in stages

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
    assert "kalm - baseline (paired)" in text
    assert f"{100 * seen_diff:+.1f} [" in next(line for line in text.splitlines() if line.startswith("| seen |"))

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    run_pipeline(config, tmp_path)  # everything cached: nothing is rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()} == before

    grounded = next((tmp_path / "stages").glob("ground-*"))
    _check_adopting_a_grounded_model(config, grounded, tmp_path / "adopt")

    changed = replace(config, train=replace(config.train, steps=30))
    monkeypatch.setattr(kalm.pipeline, "free_cores", lambda: 1)  # now one after another, in this process
    run_pipeline(changed, tmp_path)  # only policy training and what follows is redone
    new = {p.name for p in (tmp_path / "stages").iterdir()} - set(before)
    assert new and all(n.startswith(("train-", "evaluate-baseline", "evaluate-kalm", "showcase")) for n in new)
    assert sum(n.startswith(("train-", "evaluate-baseline", "evaluate-kalm")) for n in new) == 8


def test_paired_differences_refuse_runs_of_different_episodes(tmp_path):
    from kalm.pipeline import _paired_differences

    def run(name, instruction, success):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"results": [{"level": "seen", "index": 0, "instruction": instruction,
                                                 "success": success}]}))
        return path

    same = _paired_differences([run("a", "push red left", True)], [run("b", "push red left", False)])
    assert same["seen"].mean == 1.0 and same["seen"].episodes == 1
    with pytest.raises(ValueError, match="did not run the same episodes"):
        _paired_differences([run("c", "push red left", True)], [run("d", "push blue left", True)])
    other_plan = run("e", "push red left", True)
    other_plan.write_text(json.dumps({**json.loads(other_plan.read_text()), "seed": 7}))
    with pytest.raises(ValueError, match="different evaluation plans"):
        _paired_differences([other_plan], [run("f", "push red left", True)])


def test_every_clevr_preset_is_a_valid_config():
    for name in PRESETS:
        config = load_config(name)
        if config.env == "clevr":
            assert check_config(config).name == "clevr"
    gpu, default = load_config("clevr-gpu"), load_config("clevr-default")
    assert gpu.grounding.steps * gpu.grounding.batch_tokens >= 10 * default.grounding.steps * default.grounding.batch_tokens
    assert (gpu.train, gpu.seeds, gpu.imagine_counts) == (default.train, default.seeds, default.imagine_counts)


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


def _check_adopting_a_grounded_model(config, grounded, out):
    """A model grounded elsewhere (``grounded_model``) becomes the ground stage: copied
    byte for byte, its metrics as the stage summary, keyed by content."""
    adopted = replace(config, grounded_model=str(grounded / "model"), llm="no/such/model")
    spec = check_config(adopted)  # llm is not consulted when a grounded model is given
    stage = _ground(StageCache(out), spec, adopted, real=None)
    files = sorted(p.relative_to(grounded / "model") for p in (grounded / "model").rglob("*") if p.is_file())
    assert files and all((stage.path / "model" / f).read_bytes() == (grounded / "model" / f).read_bytes()
                         for f in files)
    summary = json.loads((stage.path / "stage.json").read_text())["summary"]
    assert summary["steps"] == json.loads((grounded / "metrics.json").read_text())["steps"]
    assert _ground(StageCache(out), spec, adopted, real=None).cached

    with pytest.raises(ValueError, match=r"grounded_model.*not a grounded model directory"):
        check_config(replace(config, grounded_model=str(out / "missing")))
    meta = json.loads((grounded / "model" / "grounding_config.json").read_text())
    foreign = out / "foreign"
    foreign.mkdir()
    (foreign / "grounding_config.json").write_text(json.dumps({**meta, "state_dim": 39}))
    with pytest.raises(ValueError, match=r"grounded_model.*state_dim 39"):
        check_config(replace(config, grounded_model=str(foreign)))
