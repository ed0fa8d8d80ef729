"""Grounding across processes: ``accelerate launch`` with two CPU processes (gloo)
trains data-parallel and follows the one-process run with the same global batch, and a
two-process run that loses a process resumes, under either process count, to the
uninterrupted result.

Each run is a real ``accelerate launch`` of ``kalm ground`` on the tiny backbone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from kalm.data.collect import CollectConfig, collect_to_file
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


def _launch(processes: int, data: Path, llm: Path, out: Path, *extra) -> subprocess.Popen:
    """``accelerate launch`` of ``kalm ground``: ``--multi_gpu`` is accelerate's torchrun
    launcher, which on a machine without GPUs starts CPU processes joined by gloo."""
    _PORT[0] += 1
    launcher = ["--multi_gpu", "--main_process_port", str(_PORT[0])] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "kalm.cli", "ground", "--data", str(data), "--llm", str(llm), "--out", str(out),
               "--steps", str(STEPS), "--checkpoint-every", "5", "--threads", "1", "--micro-batches", "2", *extra]
    log = open(out.with_suffix(".log"), "ab")  # noqa: SIM115 - the launcher writes to it for its whole life
    return subprocess.Popen(command, stdout=log, stderr=log)


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
