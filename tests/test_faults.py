"""Killed runs lose nothing: long stages run as real ``kalm`` processes, are killed with
SIGKILL at chosen points, resumed, and must end exactly where an uninterrupted run
with the same seed ends. Nothing a kill leaves behind may pass for a finished output.

CI runs one kill per stage; ``pytest -m slow tests/test_faults.py`` kills each stage
at several points in a row and also kills and resumes ``kalm run`` on the tiny config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kalm.data.collect import CollectConfig, collect_to_file, partial_dir
from kalm.data.episodes import load_episodes
from kalm.envs import get_spec
from kalm.offline.config import TrainConfig
from kalm.offline.train import read_curve, train

SPEC = get_spec("clevr")
COLLECT = CollectConfig(episodes=24, seed=5, epsilon=0.1, chunk_size=8)
TRAIN = TrainConfig(algo="cql", steps=90, checkpoint_every=15, seed=2, encoder="minilm")
WAIT_S = 300  # a generous bound so a broken stage fails the test instead of hanging it


def kalm_process(*args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    handle = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "kalm.cli", *map(str, args)], stdout=handle, stderr=handle, env=env)


def wait_until(condition, process: subprocess.Popen, log: Path, what: str) -> None:
    """Poll until ``condition()`` holds; fail if the process ends first."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended ({process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]


def assert_same_episodes(a, b) -> None:
    assert len(a.episodes) == len(b.episodes)
    for x, y in zip(a.episodes, b.episodes):
        for name in ("observations", "actions", "rewards"):
            got, want = getattr(x, name), getattr(y, name)
            assert got.dtype == want.dtype and np.array_equal(got, want), name
        assert (x.terminated, x.truncated, x.instruction, x.task) == (y.terminated, y.truncated, y.instruction, y.task)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_weights(a: Path, b: Path) -> None:
    """Networks and optimiser states, bit for bit."""
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert wa.keys() == wb.keys()
    for module in wa:
        assert _equal(wa[module], wb[module]), module


# ----------------------------------------------------------------------------- collect
@pytest.fixture(scope="module")
def reference_data(tmp_path_factory) -> Path:
    """The uninterrupted collection."""
    out = tmp_path_factory.mktemp("ref") / "real.h5"
    collect_to_file(SPEC, COLLECT, out, progress=False)
    return out


def _collect_args(out: Path) -> tuple:
    return ("collect", "--episodes", COLLECT.episodes, "--seed", COLLECT.seed, "--epsilon", COLLECT.epsilon,
            "--chunk-size", COLLECT.chunk_size, "--out", out)


def _shard(out: Path, i: int) -> Path:
    return partial_dir(out) / f"shard-{i:05d}.h5"


COLLECT_KILLS = {
    "before any shard": lambda out: (partial_dir(out) / "config.json").exists(),
    "after shard 0": lambda out: _shard(out, 0).exists(),
    "after shard 1": lambda out: _shard(out, 1).exists(),
    "after shard 2, before the final file": lambda out: _shard(out, 2).exists(),
}


def _collect_with_kills(tmp_path: Path, reference: Path, kill_points: list[str]) -> int:
    out, log = tmp_path / "real.h5", tmp_path / "collect.log"
    survived = 0
    for point in kill_points:
        process = kalm_process(*_collect_args(out), log=log)
        wait_until(lambda: COLLECT_KILLS[point](out) or out.exists(), process, log, point)
        kill(process)
        survived += 1
        if out.exists():
            # The kill landed after the final rename: a file at `out` is only ever whole.
            assert_same_episodes(load_episodes(out, SPEC), load_episodes(reference, SPEC))
            break
        # What the kill left is not a finished dataset; the finished shards are whole.
        for shard in partial_dir(out).glob("shard-*.h5"):
            assert len(load_episodes(shard, SPEC).episodes) == COLLECT.chunk_size
    print(f"collect: resumed after {survived} kills ({', '.join(kill_points[:survived])})")
    finish(kalm_process(*_collect_args(out), log=log), log)
    assert_same_episodes(load_episodes(out, SPEC), load_episodes(reference, SPEC))
    assert not partial_dir(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".h5" or p.name.startswith(".")] == ["real.h5"]
    return survived


def test_collect_killed_after_a_shard_resumes_to_the_same_episodes(tmp_path, reference_data):
    assert _collect_with_kills(tmp_path, reference_data, ["after shard 0"]) == 1


@pytest.mark.slow
def test_collect_survives_a_kill_at_every_shard(tmp_path, reference_data):
    assert _collect_with_kills(tmp_path, reference_data, list(COLLECT_KILLS)) == len(COLLECT_KILLS)


# ----------------------------------------------------------------------------- train
def _train_args(data: Path, out: Path, resume: bool) -> tuple:
    return ("train", "--data", data, "--out", out, "--algo", TRAIN.algo, "--steps", TRAIN.steps,
            "--checkpoint-every", TRAIN.checkpoint_every, "--seed", TRAIN.seed, "--encoder", TRAIN.encoder,
            *(["--resume"] if resume else []))


def _checkpoint_step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


TRAIN_KILLS = {
    "before the first checkpoint": lambda out: (out / "config.json").exists(),
    "after the first checkpoint": lambda out: _checkpoint_step(out) >= 15,
    "mid-run": lambda out: _checkpoint_step(out) >= 45,
    "after the last checkpoint before the end": lambda out: _checkpoint_step(out) >= 75,
}


@pytest.fixture(scope="module")
def reference_policy(tmp_path_factory, reference_data) -> Path:
    out = tmp_path_factory.mktemp("ref-policy") / "policy"
    train(reference_data, out, TRAIN, progress=False)
    return out


def _train_with_kills(tmp_path: Path, data: Path, reference: Path, kill_points: list[str]) -> int:
    from typer.testing import CliRunner

    from kalm.cli import app

    out, log = tmp_path / "policy", tmp_path / "train.log"
    survived = 0
    for i, point in enumerate(kill_points):
        process = kalm_process(*_train_args(data, out, resume=i > 0), log=log)
        wait_until(lambda: TRAIN_KILLS[point](out) or (out / "model.pt").exists(), process, log, point)
        kill(process)
        survived += 1
        config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        if config.get("completed_steps") == TRAIN.steps:  # the kill landed after the run finished
            break
        # A killed run is never taken for a trained policy.
        result = CliRunner().invoke(app, ["evaluate", "--policy", str(out), "--level", "seen", "--episodes", "1",
                                          "--out", str(tmp_path / "e.json")])
        assert result.exit_code == 2 and ("unfinished run" in result.stderr or "not found" in result.stderr), \
            result.stderr
    print(f"train: resumed after {survived} kills ({', '.join(kill_points[:survived])})")
    finish(kalm_process(*_train_args(data, out, resume=True), log=log), log)
    stored = json.loads((out / "config.json").read_text())
    assert stored["completed_steps"] == TRAIN.steps
    assert [row["step"] for row in read_curve(out / "curve.csv")] == list(range(1, TRAIN.steps + 1))
    assert read_curve(out / "curve.csv") == read_curve(reference / "curve.csv")
    assert_same_weights(out / "model.pt", reference / "model.pt")
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [f"model-{TRAIN.steps:09d}.pt", "state.json"]
    return survived


def test_train_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, reference_data, reference_policy):
    assert _train_with_kills(tmp_path, reference_data, reference_policy, ["after the first checkpoint"]) == 1


@pytest.mark.slow
def test_train_survives_kills_at_several_points(tmp_path, reference_data, reference_policy):
    assert _train_with_kills(tmp_path, reference_data, reference_policy, list(TRAIN_KILLS)) == len(TRAIN_KILLS)


# ----------------------------------------------------------------------------- kalm run
@pytest.fixture(scope="module")
def tiny_llm(tiny_backbone) -> str:
    return str(tiny_backbone)


def _stage(out: Path, prefix: str, partial: bool = False) -> list[Path]:
    pattern = f".{prefix}-*.partial" if partial else f"{prefix}-*"
    return sorted((out / "stages").glob(pattern)) if (out / "stages").exists() else []


def _complete(out: Path, prefix: str) -> bool:
    return any((p / "stage.json").exists() for p in _stage(out, prefix))


# Stage completions persist, so polling cannot miss them; a kill lands while the
# following stage runs. (The tiny config trains in under a second, too fast to catch
# inside a training stage; `train` is killed mid-run above.)
RUN_KILLS = {
    "mid collection": lambda out: any(_shard(p / "real.h5", 0).exists() for p in _stage(out, "collect", partial=True)),
    "mid grounding": lambda out: any((p / "checkpoints").exists() for p in _stage(out, "ground", partial=True)),
    "after the first policy": lambda out: _complete(out, "train-baseline-s0"),
    "after the first evaluation": lambda out: _complete(out, "evaluate-baseline-s0"),
}


def _stage_results(out: Path) -> dict[str, object]:
    """What the finished stages computed, by stage name (timings left out)."""
    results = {}
    for record in sorted((out / "stages").glob("*/stage.json")):
        stage = json.loads(record.read_text())
        results[stage["stage"]] = (stage["key"], json.dumps(stage["summary"], sort_keys=True, default=str))
    return results


@pytest.mark.slow
def test_kalm_run_killed_at_several_stages_resumes_to_the_same_results(tmp_path, tiny_llm):
    from kalm.pipeline import PRESETS, run_pipeline

    reference = tmp_path / "reference"
    run_pipeline(replace(PRESETS["clevr-tiny"](), llm=tiny_llm), reference)

    out, log = tmp_path / "run", tmp_path / "run.log"
    args = ("run", "--config", "clevr-tiny", "--llm", tiny_llm, "--out", out)
    survived = 0
    for point, reached in RUN_KILLS.items():
        process = kalm_process(*args, log=log)
        if survived == 0:  # while it runs, a second run on the same directory is refused
            wait_until(lambda: (out / ".kalm-run.lock").exists() and (out / "config.json").exists(), process, log,
                       "the lock")
            os.kill(process.pid, signal.SIGSTOP)  # hold the first run where it is while the second starts
            try:
                second = subprocess.run([sys.executable, "-m", "kalm.cli", *map(str, args)], capture_output=True,
                                        text=True, timeout=WAIT_S)
            finally:
                os.kill(process.pid, signal.SIGCONT)
            assert second.returncode == 2 and f"in use by pid {process.pid}" in second.stderr, second.stderr
            assert len([line for line in second.stderr.splitlines() if line.startswith("error:")]) == 1
        wait_until(lambda: reached(out) or (out / "report.md").exists(), process, log, point)
        kill(process)
        if (out / "report.md").exists():  # it finished before the kill landed
            break
        # A killed stage is never taken for a finished one.
        assert all((p / "stage.json").exists() for p in (out / "stages").iterdir() if not p.name.startswith("."))
        survived += 1
    finish(kalm_process(*args, log=log), log)

    assert (out / "report.md").exists()
    ours, theirs = _stage_results(out), _stage_results(reference)
    timing_free = {"ground"}  # its summary holds timings; compared through its outputs below
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name][0] == theirs[name][0], name
        if name not in timing_free and not name.startswith("train-"):
            assert ours[name][1] == theirs[name][1], name
    (collect_ours,), (collect_ref,) = _stage(out, "collect"), _stage(reference, "collect")
    assert_same_episodes(load_episodes(collect_ours / "real.h5", SPEC), load_episodes(collect_ref / "real.h5", SPEC))
    for stage in _stage(reference, "train-"):
        assert_same_weights(out / "stages" / stage.name / "policy" / "model.pt", stage / "policy" / "model.pt")
    for stage in _stage(reference, "evaluate-"):
        assert json.loads((out / "stages" / stage.name / "results.json").read_text()) == \
            json.loads((stage / "results.json").read_text())
    assert not [p for p in (out / "stages").iterdir() if p.name.endswith(".partial")]
    print(f"kalm run: resumed after {survived} kills ({', '.join(list(RUN_KILLS)[:survived])}), results unchanged")
    assert survived >= 3, survived
