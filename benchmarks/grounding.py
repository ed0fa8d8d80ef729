"""Grounding: training tokens/s and peak memory, LoRA against full fine-tuning.

Each configuration trains in its own process (``python -m benchmarks.grounding
--one ...``) so its peak resident memory (VmHWM) is its own and not the largest of
all. The timed steps are the library's real training loop (``train_grounding``) on
real CLEVR-Robot episodes, with evaluation and checkpoints switched off; the first
steps are excluded by timing a short and a longer run and taking the difference, as
the offline RL benchmark does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

MODELS = ("smollm2", "tiny")


def tiny_backbone(directory: Path) -> Path:
    """A randomly initialised 2-layer Llama with the SmolLM2 tokenizer (the test model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kalm.grounding.backbone import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_one(data: Path, llm: str, finetune: str, short: int, long: int, threads: int, precision: str = "fp32",
                attention: str = "auto") -> dict:
    """Train ``short`` then ``long`` steps; tokens/s over the difference."""

    from kalm.data.episodes import load_episodes
    from kalm.envs import get_spec
    from kalm.grounding.finetune import GroundingConfig, train_grounding
    from kalm.threads import set_torch_threads

    set_torch_threads(threads)
    spec = get_spec("clevr")
    dataset = load_episodes(data, spec)
    base = GroundingConfig(finetune=finetune, validation_fraction=0.0, checkpoint_every=0, num_threads=threads,
                           precision=precision, train_attention=attention, warmup_steps=1)
    runs = {}
    for steps in (short, long):
        with tempfile.TemporaryDirectory() as tmp:
            runs[steps] = train_grounding(spec, dataset, llm, Path(tmp) / "g", replace(base, steps=steps),
                                          progress=False)
    seconds = runs[long]["train_seconds"] - runs[short]["train_seconds"]
    tokens = runs[long]["train_tokens"] - runs[short]["train_tokens"]
    return {"llm": llm, "finetune": finetune, "precision": runs[long]["precision"],
            "attention": runs[long]["train_attention"], "steps": long - short, "seconds": seconds,
            "steps_per_s": (long - short) / max(seconds, 1e-9), "tokens_per_s": tokens / max(seconds, 1e-9),
            "peak_rss_mb": _peak_rss_mb(), "threads": threads}


# (model, fine-tuning, precision, attention). The SmolLM2 LoRA rows compare the CPU
# attention kernels side by side in the pipeline's precision (auto: bf16 where the CPU
# has it) and in fp32; full fine-tuning is timed once, with the default kernel.
VARIANTS = (
    ("smollm2", "lora", "auto", "sdpa"), ("smollm2", "lora", "auto", "eager"),
    ("smollm2", "lora", "fp32", "sdpa"), ("smollm2", "lora", "fp32", "eager"),
    ("smollm2", "full", "fp32", "auto"),
    ("tiny", "lora", "fp32", "auto"), ("tiny", "full", "fp32", "auto"),
)


def run(quick: bool = False, threads: int = 2) -> tuple[str, list[dict]]:
    """Every variant, each in a fresh process; a markdown table and rows."""
    from kalm.data.collect import collect_expert
    from kalm.data.episodes import save_episodes
    from kalm.envs import get_spec

    spec = get_spec("clevr")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = save_episodes(collect_expert(spec, episodes=60, seed=0, epsilon=0.1, reward="sparse", progress=False),
                             Path(tmp) / "d.h5")
        tiny = tiny_backbone(Path(tmp) / "tiny")
        for name, finetune, precision, attention in VARIANTS:
            llm = str(tiny) if name == "tiny" else name
            short, long = (2, 6) if quick else ((3, 15) if name == "smollm2" else (5, 45))
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.grounding", "--one", str(data), llm, finetune,
                 str(short), str(long), str(threads), precision, attention], capture_output=True, text=True,
                check=False)
            if out.returncode != 0:
                raise RuntimeError(f"grounding benchmark {name}/{finetune}/{precision}/{attention} failed:\n"
                                   f"{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["llm"] = name
            rows.append(row)
    lines = [f"## Grounding (training loop, {threads} torch threads, real CLEVR-Robot batches of <= 640 padded "
             "tokens)", "",
             "| model | fine-tuning | precision | attention | steps/s | tokens/s | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['llm']} | {r['finetune']} | {r['precision']} | {r['attention']} | "
                     f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    for name, finetune, precision in {(r["llm"], r["finetune"], r["precision"]) for r in rows}:
        same = {r["attention"]: r for r in rows
                if (r["llm"], r["finetune"], r["precision"]) == (name, finetune, precision)}
        if "eager" in same and "sdpa" in same:
            ratio = same["eager"]["tokens_per_s"] / same["sdpa"]["tokens_per_s"]
            lines.append(f"\n{name} {finetune} {precision}: eager attention trains {ratio:.2f}x the tokens/s of sdpa.")
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=8,
                        metavar=("DATA", "LLM", "FINETUNE", "SHORT", "LONG", "THREADS", "PRECISION", "ATTENTION"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.one:
        data, llm, finetune, short, long, threads, precision, attention = args.one
        print(json.dumps(measure_one(Path(data), llm, finetune, int(short), int(long), int(threads), precision,
                                     attention)))
    else:
        print(run(quick=args.quick)[0])


if __name__ == "__main__":
    main()
