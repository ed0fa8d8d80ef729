"""Stage outputs are trusted only when complete; keys follow configs; runs are locked."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import pytest

import kalm.pipeline.cache as cache_module
from kalm.pipeline.cache import RunLock, RunLockedError, StageCache, code_digest, stage_key


def test_a_completed_stage_is_reused_and_a_changed_config_rebuilds(tmp_path):
    cache, calls = StageCache(tmp_path), []

    def build(out):
        calls.append(out)
        (out / "x.txt").write_text("done")
        return {"n": 1}

    first = cache.run("collect", {"episodes": 10}, build)
    again = cache.run("collect", {"episodes": 10}, build)
    other = cache.run("collect", {"episodes": 20}, build)
    assert len(calls) == 2 and again.cached and not first.cached and other.key != first.key
    assert json.loads((first.path / "stage.json").read_text())["summary"] == {"n": 1}


def test_a_stage_killed_midway_is_rebuilt_not_trusted(tmp_path):
    cache = StageCache(tmp_path)

    def crash(out):
        (out / "half.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("ground", {"steps": 5}, crash)
    assert not cache.is_complete("ground", stage_key("ground", {"steps": 5}))
    seen = []

    def resume(out):
        seen.append((out / "half.txt").exists())  # the partial work is there to resume from
        (out / "model.txt").write_text("ok")

    result = cache.run("ground", {"steps": 5}, resume)
    assert seen == [True] and (result.path / "model.txt").exists() and not result.cached


def test_a_directory_without_its_record_is_discarded(tmp_path):
    cache = StageCache(tmp_path)
    key = stage_key("train", {"a": 1})
    fake = cache.path("train", key)
    fake.mkdir()
    (fake / "policy.bin").write_text("looks finished")
    result = cache.run("train", {"a": 1}, lambda out: (out / "policy.bin").write_text("real"))
    assert (result.path / "policy.bin").read_text() == "real"


def test_inputs_change_the_key():
    assert stage_key("train", {}, {"data": "abc"}) != stage_key("train", {}, {"data": "abd"})


def _hold(path, ready, release):
    with RunLock(path):
        ready.set()
        release.wait(10)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(RunLockedError, match="in use by pid"), RunLock(tmp_path):
            pass
    finally:
        release.set()
        holder.join()
    with RunLock(tmp_path):  # free again once the holder is gone
        pass


def test_the_code_digest_follows_imports_and_ignores_unrelated_modules(tmp_path):
    """A stage's code is its modules and every kalm module they import, at the top or
    inside a function; other modules do not count."""
    root = tmp_path / "kalm"
    shutil.copytree(cache_module.KALM_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    ground, train = ["kalm.grounding.finetune"], ["kalm.offline.train"]
    before = code_digest(ground, root=root), code_digest(train, root=root)
    assert before == (code_digest(ground), code_digest(train))  # the copy is the package
    with (root / "grounding" / "model.py").open("a") as f:  # imported by finetune through checkpoint too
        f.write("\n# a change\n")
    assert code_digest(ground, root=root) != before[0] and code_digest(train, root=root) == before[1]
    with (root / "data" / "episodes.py").open("a") as f:  # read by training, not by grounding
        f.write("\n# a change\n")
    assert code_digest(train, root=root) != before[1]


def test_a_code_change_invalidates_the_stage(tmp_path, monkeypatch):
    package = tmp_path / "kalm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("def compute():\n    from kalm.helper import value\n    return value\n")
    (package / "helper.py").write_text("value = 1\n")
    (package / "unrelated.py").write_text("x = 1\n")
    monkeypatch.setattr(cache_module, "KALM_ROOT", package)
    cache, calls = StageCache(tmp_path / "stages"), []

    def build(out):
        calls.append(out)

    first = cache.run("collect", {"episodes": 10}, build, code=["kalm.stage"])
    (package / "unrelated.py").write_text("x = 2\n")
    assert cache.run("collect", {"episodes": 10}, build, code=["kalm.stage"]).cached and len(calls) == 1
    (package / "helper.py").write_text("value = 2\n")
    changed = cache.run("collect", {"episodes": 10}, build, code=["kalm.stage"])
    assert not changed.cached and changed.key != first.key and len(calls) == 2
    record = json.loads((changed.path / "stage.json").read_text())
    assert record["code"].startswith(f"kalm {cache_module.kalm.__version__}; ")
