"""Every heavy stage across processes, each run a real ``accelerate launch`` of ``kalm``
with two CPU processes (gloo) against one:

- grounding trains data-parallel and follows the one-process loss curve with the same
  global batch; a two-process run that loses a process resumes, under either process
  count, to the uninterrupted result;
- collection, evaluation and imagination shard their work and write the files a
  one-process run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from safetensors.torch import load_file

from kalm.data.collect import CollectConfig, collect_to_file
from kalm.data.episodes import load_episodes
from kalm.envs import get_spec
from kalm.files import read_curve

WAIT_S = 300
STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-data") / "real.h5"
    collect_to_file(get_spec("clevr"), CollectConfig(episodes=24, seed=5, epsilon=0.1, chunk_size=8), out,
                    progress=False)
    return out


_PORT = [29611]


def _launch_kalm(processes: int, log: Path, *args) -> subprocess.Popen:
    """``accelerate launch`` of a ``kalm`` command, one torch thread per process:
    ``--multi_gpu`` is accelerate's torchrun launcher, which on a machine without GPUs
    starts CPU processes joined by gloo."""
    _PORT[0] += 1
    launcher = ["--multi_gpu", "--main_process_port", str(_PORT[0])] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "kalm.cli",
               *map(str, args)]
    handle = open(log, "ab")  # noqa: SIM115 - the launcher writes to it for its whole life
    return subprocess.Popen(command, stdout=handle, stderr=handle, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _run_kalm(processes: int, log: Path, *args) -> None:
    process = _launch_kalm(processes, log, *args)
    assert process.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]


def _launch(processes: int, data: Path, llm: Path, out: Path, *extra) -> subprocess.Popen:
    return _launch_kalm(processes, out.with_suffix(".log"), "ground", "--data", data, "--llm", llm, "--out", out,
                        "--steps", STEPS, "--checkpoint-every", 5, "--threads", 1, "--micro-batches", 2, *extra)


def _finish(process: subprocess.Popen, out: Path) -> dict:
    assert process.wait(timeout=WAIT_S) == 0, out.with_suffix(".log").read_text()[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _weights(out: Path) -> dict:
    return {**load_file(out / "model" / "io_layers.safetensors"),
            **load_file(out / "model" / "adapter" / "adapter_model.safetensors")}


def _assert_same_training(a: Path, b: Path, atol: float) -> None:
    curve_a, curve_b = read_curve(a / "loss_curve.csv"), read_curve(b / "loss_curve.csv")
    assert [r["step"] for r in curve_a] == [r["step"] for r in curve_b] == list(range(1, STEPS + 1))
    for x, y in zip(curve_a, curve_b):
        assert x["loss"] == pytest.approx(y["loss"], abs=atol), x["step"]
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert float((wa[name].float() - wb[name].float()).abs().max()) <= atol, name


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data, tiny_backbone) -> Path:
    out = tmp_path_factory.mktemp("dist") / "two"
    metrics = _finish(_launch(2, data, tiny_backbone, out), out)
    assert metrics["processes"] == 2
    return out


def test_two_process_grounding_follows_the_one_process_loss_curve(tmp_path, data, tiny_backbone, two_process_run):
    one = tmp_path / "one"
    metrics = _finish(_launch(1, data, tiny_backbone, one), one)
    assert metrics["processes"] == 1
    # the same global batch (2 micro-batches: both in one process, or one in each)
    _assert_same_training(one, two_process_run, atol=1e-5)
    two = json.loads((two_process_run / "metrics.json").read_text())
    assert two["train_tokens"] == metrics["train_tokens"]
    assert two["dynamics_mse"] == pytest.approx(metrics["dynamics_mse"], rel=1e-4)


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if "kalm.cli" in " ".join(p.cmdline())]


@pytest.mark.parametrize("resume_processes", [2, 1])
def test_a_two_process_run_that_loses_a_process_resumes_to_the_same_result(tmp_path, data, tiny_backbone,
                                                                          two_process_run, resume_processes):
    out = tmp_path / "killed"
    launcher = _launch(2, data, tiny_backbone, out)
    deadline = time.monotonic() + WAIT_S
    while not list((out / "checkpoints").glob("step-*")):
        assert launcher.poll() is None, out.with_suffix(".log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    workers = _workers(launcher)
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=WAIT_S) != 0
    psutil.wait_procs(workers, timeout=30)  # the launcher stops the surviving process too
    assert not any(w.is_running() for w in workers)
    assert not (out / "metrics.json").exists()

    metrics = _finish(_launch(resume_processes, data, tiny_backbone, out, "--resume"), out)
    assert 0 < metrics["resumed_from"] < STEPS
    _assert_same_training(out, two_process_run, atol=1e-5)


# ----------------------------------------------------------------------------- collect, evaluate, imagine
def _same_episodes(a: Path, b: Path) -> None:
    x, y = (load_episodes(p, get_spec("clevr")) for p in (a, b))
    assert len(x.episodes) == len(y.episodes) > 0
    for e, f in zip(x.episodes, y.episodes):
        assert np.array_equal(e.observations, f.observations) and np.array_equal(e.actions, f.actions)
        assert (e.instruction, e.task, e.terminated, e.truncated) == (f.instruction, f.task, f.terminated, f.truncated)


def test_two_process_collection_writes_the_one_process_file(tmp_path):
    args = ("collect", "--episodes", 14, "--chunk-size", 3, "--seed", 2, "--epsilon", 0.1)
    for n in (1, 2):
        _run_kalm(n, tmp_path / f"{n}.log", *args, "--out", tmp_path / f"{n}.h5")
    _same_episodes(tmp_path / "1.h5", tmp_path / "2.h5")
    assert not list(tmp_path.glob("*.partial"))


def test_two_process_evaluation_writes_the_one_process_results(tmp_path):
    args = ("evaluate", "--baseline", "random", "--env", "clevr", "--level", "all", "--episodes", 5, "--seed", 3)
    for n in (1, 2):
        _run_kalm(n, tmp_path / f"{n}.log", *args, "--out", tmp_path / f"{n}.json")
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert len(one["results"]) == 4 * 5 and one == two


@pytest.mark.parametrize("level", ["rephrase", "hard"])
def test_two_process_imagination_writes_the_one_process_file(tmp_path, grounded_model, level):
    """Batches dealt round-robin (5 of 8 prompts: the last one short); the hard level's
    conjunctions are imagined part by part and shared by the first process."""
    args = ("imagine", "--model", grounded_model, "--level", level, "--n", 36, "--batch-size", 8, "--max-steps", 6,
            "--temperature", 1.0, "--keep-failures", "--no-physics-filter", "--compose", "--seed", 3)
    for n in (1, 2):
        _run_kalm(n, tmp_path / f"{n}.log", *args, "--out", tmp_path / f"{n}.h5")
    _same_episodes(tmp_path / "1.h5", tmp_path / "2.h5")
    stats = [(tmp_path / f"{n}.h5.stats.json").read_text() for n in (1, 2)]
    assert stats[0] == stats[1]


# ----------------------------------------------------------------------------- kalm run
def test_kalm_run_under_two_processes_gives_the_one_process_results(tmp_path, tiny_backbone):
    """Every stage of the tiny experiment: the same stage keys, imagined files and
    evaluation results as one process (grounding's global batch split in two)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"preset": "clevr-tiny", "llm": str(tiny_backbone),
                                  "grounding": {"micro_batches": 2}}))
    for n in (1, 2):
        _run_kalm(n, tmp_path / f"run{n}.log", "run", "--config", config, "--out", tmp_path / f"run{n}")
    one, two = (tmp_path / f"run{n}" / "stages" for n in (1, 2))
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) > 10
    for name in names:
        if name.startswith("evaluate-"):
            assert json.loads((one / name / "results.json").read_text()) == \
                json.loads((two / name / "results.json").read_text()), name
        if name.startswith("imagine-") and (one / name / "imagined.h5").exists():
            _same_episodes(one / name / "imagined.h5", two / name / "imagined.h5")
    assert (tmp_path / "run2" / "report.html").exists() and (tmp_path / "run2" / "run.json").exists()


def test_kalm_run_refuses_a_global_batch_the_processes_cannot_share(tmp_path, tiny_backbone):
    process = _launch_kalm(2, tmp_path / "log", "run", "--config", "clevr-tiny", "--llm", tiny_backbone,
                           "--out", tmp_path / "run")
    assert process.wait(timeout=WAIT_S) != 0
    log = (tmp_path / "log").read_text()
    assert "error: config field 'grounding.micro_batches'" in log and '{"grounding": {"micro_batches": 2}}' in log
    assert not (tmp_path / "run" / "stages").exists()


@pytest.mark.parametrize("argv", [["kalm", "--help"], ["kalm", "evaluate", "--policy", "no-such-policy"]],
                         ids=["succeeds", "fails"])
def test_the_command_line_destroys_its_process_group_however_the_command_ends(tmp_path, monkeypatch, argv):
    """Left to interpreter shutdown, a gloo group can abort a process that has finished
    its work (kalm.parallel.close_process_group); the entry point destroys it first."""
    import torch.distributed as dist

    from kalm import cli

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        with pytest.raises(SystemExit):
            cli.main()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
