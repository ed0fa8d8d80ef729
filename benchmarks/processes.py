"""Grounding tokens/s and imagination rollouts/s at 1 and 2 processes (``accelerate
launch``, gloo on CPU), side by side on the same machine.

Each measurement is a fresh ``accelerate launch`` of this module's ``--worker`` mode,
which runs the library's own code: ``train_grounding`` with SmolLM2 on real CLEVR-Robot
episodes (evaluation off; tokens/s over the whole training loop, every process's
tokens counted), and ``imagine`` on the rephrase level with SmolLM2 and fresh I/O
layers (speed does not depend on what they learned), timed between two barriers so
that model loading is left out. One process gets every core as torch threads; two
processes get one thread each (torchrun's default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUND_STEPS = 12
IMAGINE_ROLLOUTS = 128


def _worker_ground(data: Path, out: Path) -> dict:
    from kalm.data.episodes import load_episodes
    from kalm.envs import get_spec
    from kalm.grounding.finetune import GroundingConfig, train_grounding

    spec = get_spec("clevr")
    config = GroundingConfig(steps=GROUND_STEPS, micro_batches=2, validation_fraction=0.0, checkpoint_every=0,
                             warmup_steps=1, num_threads=int(os.environ.get("OMP_NUM_THREADS", "0")))
    metrics = train_grounding(spec, load_episodes(data, spec), "smollm2", out, config, progress=False)
    return {"tokens_per_s": metrics["tokens_per_second"], "processes": metrics["processes"],
            "threads": metrics["torch_threads"], "precision": metrics["precision"]}


def _worker_imagine() -> dict:
    import torch

    from benchmarks.generation import build_model
    from kalm.envs import get_spec
    from kalm.imagine.generate import GenerationConfig
    from kalm.imagine.rollouts import ImagineConfig, imagine
    from kalm.parallel import process_group, wait_for_everyone

    torch.manual_seed(0)
    model = build_model()
    config = ImagineConfig(level="rephrase", n=IMAGINE_ROLLOUTS, keep_failures=True, physics_filter=False,
                           robust_noise=0.0, precision="fp32",
                           generation=GenerationConfig(max_steps=5, batch_size=16, temperature=1.0,
                                                       stop_on_done=False))
    wait_for_everyone()
    start = time.perf_counter()
    result = imagine(model, get_spec("clevr"), config, progress=False)
    wait_for_everyone()
    seconds = time.perf_counter() - start
    return {"rollouts_per_s": result.stats["counts"]["generated"] / seconds, "processes": process_group()[1],
            "threads": torch.get_num_threads(), "precision": "fp32"}


def _launch(processes: int, *worker_args: str, port: int) -> dict:
    launcher = ["--multi_gpu", "--main_process_port", str(port)] if processes > 1 else ["--cpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "benchmarks.processes", "--worker", *worker_args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(worker_args[:1])} at {processes} processes failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def run(quick: bool = False) -> tuple[str, list[dict]]:
    from kalm.data.collect import collect_expert
    from kalm.data.episodes import save_episodes
    from kalm.envs import get_spec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = save_episodes(collect_expert(get_spec("clevr"), episodes=60, seed=0, epsilon=0.1, reward="sparse",
                                            progress=False), Path(tmp) / "d.h5")
        for processes in (1, 2):
            row = _launch(processes, "ground", str(data), str(Path(tmp) / f"g{processes}"), port=29700 + processes)
            rows.append({"stage": "grounding", **row})
        for processes in (1, 2):
            rows.append({"stage": "imagination", **_launch(processes, "imagine", port=29710 + processes)})
    base = {r["stage"]: r for r in rows if r["processes"] == 1}
    lines = ["## Processes: one against two (`accelerate launch`, gloo on CPU)", "",
             f"Grounding: SmolLM2 LoRA, {GROUND_STEPS} steps of a 2-micro-batch global batch. Imagination: "
             f"{IMAGINE_ROLLOUTS} rephrase rollouts of SmolLM2, T = 5, batches of 16, fp32, sampled.", "",
             "| stage | processes | torch threads each | precision | throughput | vs one process |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        key, unit = ("tokens_per_s", "tokens/s") if r["stage"] == "grounding" else ("rollouts_per_s", "rollouts/s")
        lines.append(f"| {r['stage']} | {r['processes']} | {r['threads']} | {r['precision']} | {r[key]:,.1f} {unit} "
                     f"| {r[key] / base[r['stage']][key]:.2f}x |")
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from kalm.parallel import is_main_process

        kind, *rest = args.worker
        row = _worker_ground(Path(rest[0]), Path(rest[1])) if kind == "ground" else _worker_imagine()
        if is_main_process():
            print(json.dumps(row), flush=True)
    else:
        print(run()[0])


if __name__ == "__main__":
    main()
