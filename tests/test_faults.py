"""Killed runs lose nothing: long stages run as real ``kalm`` processes, are killed with
SIGKILL at chosen points, resumed, and must end exactly where an uninterrupted run
with the same seed ends. Nothing a kill leaves behind may pass for a finished output.

CI runs one kill per stage; ``pytest -m slow tests/test_faults.py`` kills each stage
at several points in a row and also kills and resumes ``kalm run`` on the tiny config.

A full disk (simulated with a file-size limit) must fail a command in one line and
leave the previous output, or the last checkpoint, exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
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
from kalm.files import read_curve
from kalm.offline.config import TrainConfig
from kalm.offline.train import train

SPEC = get_spec("clevr")
COLLECT = CollectConfig(episodes=24, seed=5, epsilon=0.1, chunk_size=8)
TRAIN = TrainConfig(algo="cql", steps=90, checkpoint_every=15, seed=2, encoder="minilm")
WAIT_S = 300  # a generous bound so a broken stage fails the test instead of hanging it


def kalm_process(*args, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    handle = open(log, "ab")  # noqa: SIM115 - the child process writes to it for its whole life
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
        wait_until(lambda point=point: COLLECT_KILLS[point](out) or out.exists(), process, log, point)
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
        wait_until(lambda point=point: TRAIN_KILLS[point](out) or (out / "model.pt").exists(), process, log, point)
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
        wait_until(lambda reached=reached: reached(out) or (out / "report.md").exists(), process, log, point)
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


# ----------------------------------------------------------------------------- kalm ground
# `--threads 1`: the automatic thread count follows the idle cores when a process
# starts, and float sums over 1 and 2 threads differ in the last bits (measured: I/O
# weights 5e-4 apart after 40 steps), so an uninterrupted run and a resumed one only
# agree bit for bit with the thread count pinned.
GROUND_STEPS, GROUND_EVERY = 40, 5
# Per-process figures: timings, the tokens this process trained on, the step it resumed
# from, and the running loss (an average over this process's steps only).
GROUND_SESSION_METRICS = {"train_seconds", "eval_seconds", "mlp_dynamics_seconds", "tokens_per_second",
                          "train_tokens", "resumed_from", "final_running_loss"}


def _ground_args(data: Path, llm: Path, out: Path, resume: bool) -> tuple:
    return ("ground", "--data", data, "--llm", llm, "--out", out, "--steps", GROUND_STEPS,
            "--checkpoint-every", GROUND_EVERY, "--threads", 1, *(["--resume"] if resume else []))


def _ground_checkpoint(out: Path) -> int:
    """The step of the newest finished checkpoint (0: none)."""
    from kalm.grounding.checkpoint import latest_checkpoint

    found = latest_checkpoint(out)
    return int(found.name.split("-")[1]) if found is not None else 0


# Each condition sees the run directory and what this process has logged so far.
GROUND_KILLS = {
    "before the first checkpoint": lambda out, logged: "grounding clevr on" in logged,
    "after the first checkpoint": lambda out, logged: _ground_checkpoint(out) >= GROUND_EVERY,
    "mid-run": lambda out, logged: _ground_checkpoint(out) >= GROUND_STEPS // 2,
    "after the last checkpoint": lambda out, logged: _ground_checkpoint(out) >= GROUND_STEPS - GROUND_EVERY,
    "after the final model, during evaluation": lambda out, logged: (out / "model").exists(),
}


def _logged_since(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@pytest.fixture(scope="module")
def reference_grounding(tmp_path_factory, reference_data, tiny_backbone) -> Path:
    out = tmp_path_factory.mktemp("ref-ground") / "ground"
    log = out.with_suffix(".log")
    finish(kalm_process(*_ground_args(reference_data, tiny_backbone, out, resume=False), log=log), log)
    return out


def assert_same_grounded_model(a: Path, b: Path) -> None:
    """Every file of two grounded models byte for byte, but PEFT's adapter config is
    compared as JSON: it writes its target-module set in hash-seed order."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert Path("io_layers.safetensors") in files and Path("adapter/adapter_model.safetensors") in files
    for name in files:
        if name.name == "adapter_config.json":
            ca, cb = (json.loads((m / name).read_text()) for m in (a, b))
            ca["target_modules"], cb["target_modules"] = sorted(ca["target_modules"]), sorted(cb["target_modules"])
            assert ca == cb
            continue
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _ground_with_kills(tmp_path: Path, data: Path, llm: Path, reference: Path, kill_points: list[str]) -> int:
    out, log = tmp_path / "ground", tmp_path / "ground.log"
    survived, resumed_from = 0, 0
    for i, point in enumerate(kill_points):
        offset = log.stat().st_size if log.exists() else 0
        process = kalm_process(*_ground_args(data, llm, out, resume=i > 0), log=log)
        wait_until(lambda point=point, offset=offset: GROUND_KILLS[point](out, _logged_since(log, offset))
                   or (out / "metrics.json").exists(),
                   process, log, point)
        kill(process)
        if (out / "metrics.json").exists():  # the kill landed after the run finished
            break
        survived += 1
        resumed_from = _ground_checkpoint(out)
        # A killed run is never taken for a finished one: no metrics, and a model only
        # once training is over (it is the final one; the resumed run rewrites it).
        if point != "after the final model, during evaluation":
            assert not (out / "model").exists(), point
        # and a fresh start over it is refused rather than mixing two runs
        if i == 0 and resumed_from:
            second = subprocess.run([sys.executable, "-m", "kalm.cli", *map(str, _ground_args(data, llm, out, False))],
                                    capture_output=True, text=True, timeout=WAIT_S)
            assert second.returncode == 2 and "unfinished run" in second.stderr, second.stderr
    print(f"ground: resumed after {survived} kills ({', '.join(kill_points[:survived])})")
    finish(kalm_process(*_ground_args(data, llm, out, resume=True), log=log), log)

    ours, theirs = (json.loads((p / "metrics.json").read_text()) for p in (out, reference))
    assert ours["steps"] == theirs["steps"] == GROUND_STEPS
    assert ours["resumed_from"] == resumed_from and theirs["resumed_from"] == 0
    assert ours["torch_threads"] == 1
    for metrics in (ours, theirs):
        for key in GROUND_SESSION_METRICS:
            metrics.pop(key, None)
        for row in metrics.get("growth", ()):  # the held-out figures by step, and how long each took
            row.pop("eval_seconds")
    assert "dynamics_mse" in ours and "explanation_accuracy" in ours and "generation_success" in ours
    assert ours == theirs  # the held-out metrics of the same weights, exactly
    assert_same_grounded_model(out / "model", reference / "model")
    for name in ("grounding_config.json", "split.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert (out / "loss_curve.csv").read_bytes() == (reference / "loss_curve.csv").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["grounding_config.json", "loss_curve.csv", "metrics.json", "model",
                                                     "split.json"]
    return survived


def test_ground_killed_after_a_checkpoint_resumes_to_the_same_model(tmp_path, reference_data, tiny_backbone,
                                                                    reference_grounding):
    survived = _ground_with_kills(tmp_path, reference_data, tiny_backbone, reference_grounding,
                                  ["after the first checkpoint"])
    assert survived == 1


@pytest.mark.slow
def test_ground_survives_kills_at_several_points(tmp_path, reference_data, tiny_backbone, reference_grounding):
    survived = _ground_with_kills(tmp_path, reference_data, tiny_backbone, reference_grounding, list(GROUND_KILLS))
    assert survived >= len(GROUND_KILLS) - 1, survived  # evaluation takes under a second: it may finish first


# ----------------------------------------------------------------------------- kalm imagine
# The "rephrase" level: its tasks run for many steps (the "easy" ones stop after one
# push), so generation lasts long enough to be killed in the middle.
IMAGINE_N = 96


def _imagine_args(model: Path, out: Path) -> tuple:
    return ("imagine", "--model", model, "--level", "rephrase", "--n", IMAGINE_N, "--batch-size", 4,
            "--max-steps", 12, "--temperature", 1.0, "--keep-failures", "--no-physics-filter", "--seed", 3,
            "--out", out)


def _stats(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json")


@pytest.fixture(scope="module")
def reference_imagined(tmp_path_factory, grounded_model) -> Path:
    out = tmp_path_factory.mktemp("ref-imagine") / "imagined.h5"
    log = out.with_suffix(".log")
    finish(kalm_process(*_imagine_args(grounded_model, out), log=log), log)
    return out


def _rollouts_done(log: Path) -> int:
    counts = re.findall(rf"imagine rephrase:[^\r\n|]*\|[^|]*\| *(\d+)/{IMAGINE_N}", log.read_text(errors="replace"))
    return max(map(int, counts), default=0)


def test_imagine_killed_mid_run_leaves_the_previous_output_and_reruns_to_the_same_file(
        tmp_path, reference_data, grounded_model, reference_imagined):
    out, log = tmp_path / "imagined.h5", tmp_path / "imagine.log"
    # An earlier, finished output sits at --out: a kill must leave it as it was.
    out.write_bytes(reference_data.read_bytes())
    _stats(out).write_text('{"earlier": "run"}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p != log}

    process = kalm_process(*_imagine_args(grounded_model, out), log=log)
    wait_until(lambda: _rollouts_done(log) >= 8, process, log, "8 rollouts")
    kill(process)
    done = _rollouts_done(log)
    assert done < IMAGINE_N, "the kill landed after generation; give the run more rollouts"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p != log} == before
    print(f"imagine: killed after {done} of {IMAGINE_N} rollouts; the earlier output is untouched")

    finish(kalm_process(*_imagine_args(grounded_model, out), log=log), log)
    assert out.read_bytes() == reference_imagined.read_bytes()
    assert _stats(out).read_bytes() == _stats(reference_imagined).read_bytes()
    assert_same_episodes(load_episodes(out, SPEC), load_episodes(reference_imagined, SPEC))
    assert sorted(p.name for p in tmp_path.iterdir() if p != log) == [out.name, _stats(out).name]


# ----------------------------------------------------------------------------- disk full
# A full disk without root: the child's file-size limit (RLIMIT_FSIZE) makes any write
# past `limit` bytes of one file fail with EFBIG, as ENOSPC would; SIGXFSZ is ignored so
# the write returns the error instead of killing the process. Pipes are not files, so
# the command's own output still comes back.
def kalm_with_file_size_limit(*args, limit: int) -> subprocess.CompletedProcess:
    import resource

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "kalm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=WAIT_S, preexec_fn=limit_file_size)


def assert_fails_naming(result: subprocess.CompletedProcess, path: Path) -> None:
    """Exit status 2, one `error:` line naming the file that could not be written, no traceback."""
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert f"cannot write {path}: File too large" in errors[0], errors[0]


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory``, by relative path (temporaries included)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# Collecting over an existing file with a file-size limit that stops (from the final
# file's size) the shard directory's config.json (~100 bytes), the first 8-episode
# shard, or only the final 24-episode file (a shard is about half its size): the file
# whose write fails, and the finished shards left to resume from (None: no directory).
COLLECT_FULL = {
    "the shard directory's config": (lambda size: 50, lambda out: partial_dir(out) / "config.json", None),
    "the first shard": (lambda size: 1024, lambda out: _shard(out, 0), []),
    "the final file": (lambda size: size - 1, lambda out: out, [0, 1, 2]),
}


@pytest.mark.parametrize("stage", list(COLLECT_FULL))
def test_collect_on_a_full_disk_keeps_the_previous_file_and_resumes_later(tmp_path, reference_data, stage):
    from kalm.data.episodes import save_episodes

    limit, failing, shards = COLLECT_FULL[stage]
    out = tmp_path / "real.h5"
    previous = load_episodes(reference_data, SPEC)
    save_episodes(replace(previous, episodes=previous.episodes[:3]), out)  # a good, different earlier dataset
    before = out.read_bytes()

    result = kalm_with_file_size_limit(*_collect_args(out), limit=limit(reference_data.stat().st_size))
    assert_fails_naming(result, failing(out))
    assert out.read_bytes() == before
    # No temporary anywhere; besides the old file, only whole shards to resume from.
    left = sorted(_files(tmp_path))
    if shards is None:
        assert left == ["real.h5"]
    else:
        assert left == ["real.h5", "real.h5.partial/config.json",
                        *[f"real.h5.partial/shard-{i:05d}.h5" for i in shards]]
        for i in shards:
            assert len(load_episodes(_shard(out, i), SPEC).episodes) == COLLECT.chunk_size

    # Space freed: the same command finishes the collection.
    log = tmp_path / "collect.log"
    finish(kalm_process(*_collect_args(out), log=log), log)
    assert_same_episodes(load_episodes(out, SPEC), load_episodes(reference_data, SPEC))
    assert sorted(_files(tmp_path)) == ["collect.log", "real.h5"]


def test_imagine_on_a_full_disk_keeps_the_previous_output(tmp_path, grounded_model, reference_imagined):
    out = tmp_path / "imagined.h5"
    out.write_bytes(reference_imagined.read_bytes())
    _stats(out).write_bytes(_stats(reference_imagined).read_bytes())
    before = _files(tmp_path)
    limit = 4096
    assert out.stat().st_size > limit
    args = list(_imagine_args(grounded_model, out))
    args[args.index("--seed") + 1] = 4  # another run, so a written file would differ
    assert_fails_naming(kalm_with_file_size_limit(*args, limit=limit), out)
    assert _files(tmp_path) == before


def test_train_on_a_full_disk_keeps_its_checkpoint(tmp_path, reference_data, reference_policy):
    """The policy weights (torch.save) cannot be written: the last checkpoint stays
    whole, and resuming once there is space ends at the uninterrupted run's weights."""
    out = tmp_path / "policy"
    train(reference_data, out, TRAIN, progress=False, stop_after=TRAIN.checkpoint_every)
    checkpoint = _files(out / "checkpoint")
    weights = out / "checkpoint" / f"model-{TRAIN.checkpoint_every:09d}.pt"
    limit = weights.stat().st_size // 2
    assert max(p.stat().st_size for p in out.rglob("*") if p.is_file() and p != weights) < limit // 8

    assert_fails_naming(kalm_with_file_size_limit(*_train_args(reference_data, out, resume=True), limit=limit),
                        out / "checkpoint" / f"model-{2 * TRAIN.checkpoint_every:09d}.pt")
    assert _files(out / "checkpoint") == checkpoint
    # no temporary left (the curve may hold steps past the checkpoint: a resume drops them)
    assert sorted(_files(out)) == ["algo.json", "checkpoint/" + weights.name, "checkpoint/state.json", "config.json",
                                   "curve.csv"]

    log = tmp_path / "train.log"
    finish(kalm_process(*_train_args(reference_data, out, resume=True), log=log), log)
    assert_same_weights(out / "model.pt", reference_policy / "model.pt")
    assert read_curve(out / "curve.csv") == read_curve(reference_policy / "curve.csv")


def test_ground_on_a_full_disk_fails_in_one_line_and_resumes_later(tmp_path, reference_data, tiny_backbone,
                                                                   reference_grounding):
    """The first checkpoint cannot be written (its tokenizer file alone is ~2 MB): one
    line naming it, no staging directory left; with space the same run resumes from
    nothing and ends at the uninterrupted run's model."""
    out = tmp_path / "ground"
    result = kalm_with_file_size_limit(*_ground_args(reference_data, tiny_backbone, out, resume=False),
                                       limit=1 << 20)
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-3000:])
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert f"cannot write {out / 'checkpoints'}" in errors[0] and "File too large" in errors[0], errors[0]
    assert not out.exists() or sorted(_files(out)) == [], sorted(_files(out))

    log = tmp_path / "ground.log"
    finish(kalm_process(*_ground_args(reference_data, tiny_backbone, out, resume=False), log=log), log)
    assert_same_grounded_model(out / "model", reference_grounding / "model")
