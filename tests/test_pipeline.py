"""The whole KALM pipeline end to end with a tiny model, and its stage caching."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from kalm.pipeline import PRESETS, load_config, run_pipeline


@pytest.fixture(scope="module")
def tiny_llm(tiny_backbone) -> str:
    return str(tiny_backbone)


def test_tiny_pipeline_runs_end_to_end_and_reuses_its_stages(tiny_llm, tmp_path):
    config = replace(PRESETS["clevr-tiny"](), llm=tiny_llm)
    report = run_pipeline(config, tmp_path)
    text = report.read_text()
    for method in ("baseline", "kalm", "llm-policy"):
        assert method in text
    for level in ("seen", "rephrase", "easy", "hard"):
        assert f"| {level} |" in text
    assert (tmp_path / "report.html").exists() and (tmp_path / "report_files" / "success.png").exists()
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "stages").iterdir() if not p.name.startswith("."))
    assert "collect" in stages and "ground" in stages and "imagine-hard" in stages and "showcase" in stages

    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()}
    run_pipeline(config, tmp_path)  # everything cached: nothing is rebuilt
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "stages").iterdir()} == before

    changed = replace(config, train=replace(config.train, steps=30))
    run_pipeline(changed, tmp_path)  # only policy training and what follows is redone
    new = {p.name for p in (tmp_path / "stages").iterdir()} - set(before)
    assert new and all(n.startswith(("train-", "evaluate-baseline", "evaluate-kalm", "showcase")) for n in new)


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
