"""Stage outputs are trusted only when complete; keys follow configs; runs are locked."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from kalm.stagecache import RunLock, RunLockedError, StageCache, stage_key


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
