"""``python -m benchmarks [--quick] [--model DIR] [--run DIR] [--out FILE.json]``: measure
every stage and print one markdown table per stage (also written as JSON).

Sections: environment speed and expert success; grounding tokens/s and peak memory
(LoRA vs full, SmolLM2 and the tiny test model); KV-cached vs recomputed generation;
shared vs separate prefill for several start states per instruction; hard segments in drawn order vs
grouped by phrasing; fp32 vs bf16 inference;
the LLM as a policy one episode at a time vs in lockstep batches;
offline RL steps/s; grounding and imagination at 1 and 2 processes; end-to-end stage
times of a finished ``kalm run`` directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def _machine() -> str:
    import d3rlpy
    import mujoco
    import transformers

    import kalm.offline  # noqa: F401  (silences the gym notice that importing d3rlpy prints)

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, mujoco "
            f"{mujoco.__version__}, d3rlpy {d3rlpy.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def _end_to_end(run_dir: Path) -> str:
    lines = [f"## End to end: stage times of {run_dir}", "", "| stage | seconds |", "|---|---|"]
    total = 0.0
    for record in sorted((run_dir / "stages").glob("*/stage.json")):
        data = json.loads(record.read_text())
        total += data["seconds"]
        lines.append(f"| {data['stage']} | {data['seconds']:.0f} |")
    lines.append(f"| **total** | {total:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids (a smoke run)")
    parser.add_argument("--llm", default="smollm2", help="backbone for the generation benchmark")
    parser.add_argument("--model", default=None, help="a grounded model directory to time instead of fresh layers")
    parser.add_argument("--run", type=Path, default=None, help="a finished `kalm run` directory for stage times")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/latest.json"))
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["env", "grounding", "generation", "offline", "processes"])
    args = parser.parse_args()

    sections: dict[str, object] = {"machine": _machine()}
    print(f"Machine: {sections['machine']}\n")
    if "env" not in args.skip:
        from benchmarks import env

        sections["env"] = env.run(quick=args.quick)
        print(sections["env"], "\n", flush=True)
    if "grounding" not in args.skip:
        from benchmarks import grounding

        table, rows = grounding.run(quick=args.quick, threads=torch.get_num_threads())
        sections["grounding"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
    if "generation" not in args.skip:
        from benchmarks import generation

        model = generation.build_model(args.llm, args.model)
        lengths, batches = ((10, 25), (1, 8)) if args.quick else ((10, 25, 50), (1, 8, 32))
        table, rows = generation.run(model, lengths, batches, repeats=1 if args.quick else 3)
        sections["generation"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
        table, rows = generation.run_shared_prefill(model, batch=16 if args.quick else 64,
                                                    repeats=1 if args.quick else 3)
        sections["shared_prefill"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
        table, rows = generation.run_segment_order(model, prompts=128 if args.quick else 2000)
        sections["segment_order"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
        table, rows = generation.run_precision(model, batch=16 if args.quick else 64,
                                               rollouts=32 if args.quick else 128, repeats=1 if args.quick else 3)
        sections["precision"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
        table, rows = generation.run_llm_policy(model, episodes_per_level=2 if args.quick else 8)
        sections["llm_policy"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
    if "offline" not in args.skip:
        from benchmarks import offline

        sections["offline"] = offline.run(episodes=100 if args.quick else 200)
        print(sections["offline"], "\n", flush=True)
    if "processes" not in args.skip:
        from benchmarks import processes

        table, rows = processes.run(quick=args.quick)
        sections["processes"] = {"table": table, "rows": rows}
        print(table, "\n", flush=True)
    if args.run is not None:
        sections["end_to_end"] = _end_to_end(args.run)
        print(sections["end_to_end"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(sections, indent=2, default=str))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
