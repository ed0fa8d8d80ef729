"""Grounding: fine-tune a causal LM on the four tasks, then measure it on held-out data.

One run mixes the tasks (dynamics, explanation, generation, goal) with configurable
weights: each micro-batch is one task, drawn by weight, and packs as many examples
as fit a token budget. LoRA on the attention and MLP projections by default
(``finetune="full"`` trains every LLM weight); the new I/O layers always train.

``accelerate`` makes the same code run on CPU, one GPU or several. Precision is bf16
on GPU; on CPU it is bf16 autocast when the CPU has native bf16 (AVX512-BF16/AMX),
otherwise fp32. Torch threads default to the idle cores (:mod:`kalm.threads`): threads
that outnumber them spin against each other.

Multi-GPU with DeepSpeed ZeRO-3 (parameters sharded; CPU offload of optimizer and
weights)::

    accelerate launch --config_file kalm/grounding/configs/accelerate_zero3.yaml \\
        -m kalm.cli ground --env clevr --data data/clevr.h5 --llm PATH --out runs/ground --full

(the YAML points at ``configs/zero3.json``; edit ``num_processes`` to the GPU count).

Data-parallel without DeepSpeed, on GPUs or on CPU cores (gloo), is accelerate's torchrun
launcher: ``accelerate launch --multi_gpu --num_processes 2 -m kalm.cli ground ...``.
Micro-batch ``i`` of a step's global batch (``micro_batches`` of them) runs on process
``i % N`` with the examples step ``i`` draws in one process, so a run follows the same
loss curve on any process count (tests/test_distributed.py) and resumes under another.

Checkpoints (every ``checkpoint_every`` steps, the last ``keep_checkpoints`` kept; see
:mod:`kalm.grounding.checkpoint`) hold the model, the optimizer, the scheduler and the
RNG state. Batches are a function of the step number, so a killed run resumed with
``resume=True`` follows the same path and ends at the same step (CPU, one GPU, DDP;
not under DeepSpeed, whose optimizer state is sharded).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch

from kalm.files import json_safe, write_curve, write_json_atomic
from kalm.grounding.backbone import EMBEDDED_MODELS, layers_for_depth, load_backbone, resolve_backbone
from kalm.grounding.checkpoint import (
    latest_checkpoint,
    load_grounded,
    read_training_state,
    restore_training_checkpoint,
    save_training_checkpoint,
)
from kalm.grounding.data import (
    ExampleSampler,
    choose_task,
    prepare_episodes,
    split_episodes,
    split_hindsight,
    step_rng,
)
from kalm.grounding.distributed import full_weights, make_accelerator
from kalm.grounding.dynamics_baseline import HELD_OUT_TRANSITIONS, held_out_transitions, mlp_dynamics_baseline
from kalm.grounding.metrics import evaluate_grounding
from kalm.grounding.model import GroundedLM, GroundedLMConfig, LoraSettings, NormStats, native_bf16
from kalm.grounding.objective import GroundingObjective, cosine_with_warmup, make_optimizer
from kalm.grounding.prompts import TASKS, collate
from kalm.parallel import process_group
from kalm.threads import set_torch_threads

# step, mean loss of the step's global batch; checkpoints carry the curve so far
CURVE_FILE = "loss_curve.csv"
# the held-out figures at each step of ``GroundingConfig.measure_at`` and at the end
# (written when measure_at names any step)
GROWTH_FILE = "growth.csv"
# what a growth row keeps of evaluate_grounding's metrics: one number per figure
GROWTH_FIGURES = ("dynamics_median_l2", "explanation_accuracy", "explanation_equivalent", "explanation_achieved",
                  "determined_explanation_equivalent", "generation_success")


@dataclass(frozen=True)
class GroundingConfig:
    """Training and evaluation settings; the defaults fit about 13 minutes on a 2-core
    CPU with SmolLM2-135M (docs/results.md has the measurements)."""

    # 400 steps: with eager attention on CPU they cost about what 300 did with sdpa.
    steps: int = 400
    batch_tokens: int = 640  # padded tokens per micro-batch
    max_batch_size: int = 48
    # Micro-batches per optimizer step across all processes (the global batch): under
    # `accelerate launch` with N processes each runs micro_batches / N of them, so one
    # config trains the same way on any process count.
    micro_batches: int = 1
    lr: float = 1e-3  # LoRA (or full) weights
    io_lr: float = 2e-3  # the new encoders and heads
    full_lr: float = 5e-5  # used instead of lr with finetune="full"
    weight_decay: float = 0.0
    warmup_steps: int = 15
    max_grad_norm: float = 1.0
    finetune: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    io_hidden: int = 256
    # The share of the backbone's decoder blocks kept, from the bottom (1: all of them),
    # a speed setting: grounding and imagination cost less with fewer blocks. All are
    # kept by default because imagination needs them: with half (or two thirds) of
    # SmolLM2's 30 blocks the held-out figures stayed level, yet half as many imagined
    # rollouts reached their goal; at half, KALM's lead on easy fell from 32.9 to 23.9
    # points (docs/grounding.md). A share rather than a count, so a config means the
    # same for whichever backbone `--llm` names.
    depth: float = 1.0
    # Rollout generation gets 60 % of the micro-batches because imagination is what it
    # feeds: on CLEVR-Robot it quadrupled the imagined rollouts that reach their goal,
    # at the cost of explanation accuracy (docs/results.md).
    task_weights: tuple[tuple[str, float], ...] = (
        ("dynamics", 0.5), ("explanation", 1.0), ("generation", 3.0), ("goal", 0.5))
    max_trajectory_steps: int = 16
    validation_fraction: float = 0.1
    # Share of examples drawn from hindsight-labelled simulator rollouts (kalm.data.hindsight)
    # when train_grounding is given some; their held-out part is scored either way.
    hindsight_share: float = 0.0
    # Adam steps of the plain MLP dynamics model scored beside the LLM's dynamics (0: none);
    # about 3 s on a CPU core; on CLEVR-Robot its best checkpoint comes at step 600.
    dynamics_baseline_steps: int = 1000
    precision: str = "auto"  # auto | bf16 | fp32
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    eval_episodes: int = 100
    eval_batch_size: int = 32
    # Steps at which the held-out metrics are also measured during training, so a run
    # shows how each figure grows with steps (growth.csv, the report's growth plot).
    # Each costs one evaluation (about 80 s on 2 CPU cores with the defaults).
    measure_at: tuple[int, ...] = ()
    explanation_max_tokens: int = 32
    generation_max_steps: int = 0  # 0: twice max_trajectory_steps, capped by the env horizon
    num_threads: int = 0  # 0: the cores not already busy (kalm.threads.free_cores)
    # Attention kernel while training: "auto" is eager on CPU and the backbone's own
    # choice on GPU (see _training_attention); "eager"/"sdpa" force one. The same
    # maths up to float rounding, so a runtime setting, not part of a stage's key.
    train_attention: str = "auto"

    def __post_init__(self):
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.train_attention not in ("auto", "eager", "sdpa"):
            raise ValueError(f"train_attention must be auto, eager or sdpa, got {self.train_attention!r}")
        unknown = [n for n, _ in self.task_weights if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown grounding task {unknown[0]!r} (expected one of {', '.join(TASKS)})")
        if not 0.0 <= self.hindsight_share <= 1.0:
            raise ValueError(f"hindsight_share must be in [0, 1], got {self.hindsight_share}")
        if not 0.0 < self.depth <= 1.0:
            raise ValueError(f"depth (the share of the backbone's layers kept) must be in (0, 1], got {self.depth}")
        for name in ("steps", "batch_tokens", "max_batch_size", "micro_batches", "max_trajectory_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        outside = [s for s in self.measure_at if not 0 < s < self.steps]
        if outside:
            raise ValueError(f"measure_at step {outside[0]} is not between 1 and steps - 1 ({self.steps - 1}); "
                             "the last step is always measured")

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.task_weights)

    def to_json(self) -> dict:
        d = asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        d["task_weights"] = [list(p) for p in self.task_weights]
        d["measure_at"] = list(self.measure_at)
        return d

    @classmethod
    def from_json(cls, data: dict) -> GroundingConfig:
        """The config a checkpoint recorded; one written before the LoRA settings were
        one object (flat ``lora_*`` fields) reads too."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "grad_accum" in data and "micro_batches" not in data:  # written by one process before the rename
            values["micro_batches"] = data["grad_accum"]
        lora = dict(values.get("lora") or {k: data[f"lora_{k}"] for k in ("rank", "alpha", "dropout", "targets")
                                           if f"lora_{k}" in data})
        if "targets" in lora:
            lora["targets"] = tuple(lora["targets"])
        values["lora"] = LoraSettings(**lora)
        if "task_weights" in values:
            values["task_weights"] = tuple((str(n), float(w)) for n, w in values["task_weights"])
        values["measure_at"] = tuple(int(s) for s in values.get("measure_at", ()))
        return cls(**values)


def _precision(config: GroundingConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if native_bf16() else "fp32"


def _training_attention(model: GroundedLM, choice: str, on_gpu: bool):
    """Train with the chosen attention kernel, then give the model back its own.

    Why eager on CPU: PyTorch's CPU flash-attention backward costs about a quarter of
    a SmolLM2 LoRA step on our short sequences (~40 tokens); the plain matmul-softmax
    path does the same maths without it (1.39x the tokens/s in bf16 on 2 cores,
    ``python -m benchmarks``). Generation keeps sdpa, which is faster there (one new
    token per step).
    """
    implementation = "eager" if choice == "auto" and not on_gpu else (None if choice == "auto" else choice)
    return _attention(model, implementation)


def _base_llm(model: GroundedLM):
    return model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm


@contextmanager
def _attention(model: GroundedLM, implementation: str | None):
    """The backbone's attention kernel set to ``implementation`` (None: left as it is)
    and restored afterwards; yields the kernel in use."""
    base = _base_llm(model)
    previous = getattr(base.config, "_attn_implementation", None)
    if implementation is None or implementation == previous or not hasattr(base, "set_attn_implementation"):
        yield previous
        return
    base.set_attn_implementation(implementation)
    try:
        yield implementation
    finally:
        base.set_attn_implementation(previous)


@dataclass
class _Start:
    """Where a run begins: a fresh model at step 0, or a checkpoint's."""

    model: GroundedLM
    split: dict
    step: int
    checkpoint: Path | None = None
    state: dict | None = None


def _refuse_bad_resume(out: Path, resume: bool, accelerator) -> Path | None:
    """The checkpoint to resume from (None: start afresh), refusing a run that would
    overwrite unfinished work or resume what cannot be resumed."""
    from accelerate.utils import DistributedType

    if resume and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("resume is not supported under DeepSpeed (its optimizer state is sharded across processes); "
                         "checkpoints there hold the model weights only")
    checkpoint = latest_checkpoint(out) if resume else None
    if not resume and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} holds checkpoints of an unfinished run: resume it or choose another output directory")
    if resume and checkpoint is None and (out / "model").exists():
        raise ValueError(f"nothing to resume in {out}: the run finished (see {out / 'model'})")
    return checkpoint


def _start(spec, episodes, backbone: str, config: GroundingConfig, checkpoint: Path | None, llm,
           tokenizer) -> _Start:
    if checkpoint is not None:
        state = read_training_state(checkpoint)
        saved = GroundingConfig.from_json(state["config"])
        if saved != config:
            diff = [f.name for f in fields(GroundingConfig) if getattr(saved, f.name) != getattr(config, f.name)]
            raise ValueError(f"cannot resume from {checkpoint}: its training config differs in {', '.join(diff)}")
        model = load_grounded(checkpoint / "model", spec=spec, trainable=True, backbone=backbone)
        return _Start(model, state["split"], int(state["step"]), checkpoint, state)
    train_idx, val_idx = split_episodes(episodes, config.validation_fraction, config.seed)
    if config.depth < 1.0 and llm is None:
        llm, tokenizer = load_backbone(backbone)
    layers = 0 if config.depth == 1.0 else layers_for_depth(llm, config.depth)
    torch.manual_seed(config.seed)
    train_eps = [episodes[i] for i in train_idx]
    stats = NormStats.from_arrays([e.observations for e in train_eps], [e.actions for e in train_eps], spec.discrete)
    model_config = GroundedLMConfig(
        env=spec.name, state_dim=spec.state_dim, action_dim=spec.action_dim, discrete=spec.discrete,
        backbone=_backbone_reference(backbone), finetune=config.finetune, lora=config.lora,
        io_hidden=config.io_hidden, layers=layers)
    model = GroundedLM.create(model_config, stats, llm=llm, tokenizer=tokenizer)
    return _Start(model, {"train": train_idx, "validation": val_idx}, 0)


def train_grounding(spec, dataset, backbone: str, out, config: GroundingConfig | None = None,
                    resume: bool = False, llm=None, tokenizer=None, progress: bool = True,
                    stop_after: int | None = None, hindsight=None) -> dict:
    """Ground ``backbone`` on ``dataset`` for ``spec``; writes ``out/model``,
    ``out/metrics.json`` and checkpoints, and returns the metrics.

    ``hindsight`` (an episode dataset from :mod:`kalm.data.hindsight`) is split like the
    expert data: ``config.hindsight_share`` of the training examples come from its
    training part, and its held-out part measures explanation where the answer is
    determined.

    ``llm``/``tokenizer`` may be passed pre-built (tests use a tiny random model).
    ``stop_after`` ends this session after that many steps with a checkpoint (a
    time-sliced run); ``resume=True`` continues it on the same schedule.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    config = config or GroundingConfig()
    if dataset.env != spec.name:
        raise ValueError(f"the dataset was collected in env {dataset.env!r}, not {spec.name!r}")
    out = Path(out)
    if llm is None:
        resolve_backbone(backbone)  # a bad --llm is named before anything else starts
    set_torch_threads(config.num_threads or None)
    precision = _precision(config)
    _, processes = process_group()
    if config.micro_batches % processes:
        raise ValueError(f"micro_batches ({config.micro_batches}) must be a multiple of the {processes} processes: "
                         "each runs an equal share of every step's global batch")
    accelerator = make_accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                                   gradient_accumulation_steps=config.micro_batches // processes,
                                   cpu=not torch.cuda.is_available(),
                                   kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    episodes = prepare_episodes(dataset, spec)
    if hindsight is None and config.hindsight_share > 0:
        raise ValueError(f"hindsight_share is {config.hindsight_share} but no hindsight episodes were given")
    hindsight_train, hindsight_val = split_hindsight(spec, hindsight, config.validation_fraction, config.seed)
    start = _start(spec, episodes, backbone, config, _refuse_bad_resume(out, resume, accelerator), llm, tokenizer)
    model, split = start.model, start.split
    train_eps = [episodes[i] for i in split["train"]]
    val_eps = [episodes[i] for i in split["validation"]]
    sampler = ExampleSampler(model.prompts, train_eps, config.max_trajectory_steps,
                             extra=hindsight_train, extra_share=config.hindsight_share)

    objective, optimizer, scheduler = _optimization(accelerator, start, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"grounding {spec.name} on {len(train_eps)} episodes ({len(val_eps)} held out), "
                      f"{config.finetune}, {trainable / 1e6:.2f}M trainable, {precision}, "
                      f"steps {start.step}->{config.steps}")
    loop = _TrainingLoop(accelerator, objective, optimizer, scheduler, sampler, config, out, split,
                         list((start.state or {}).get("curve", [])), list((start.state or {}).get("growth", [])),
                         partial(_held_out_metrics, spec=spec, val_eps=val_eps, determined=hindsight_val,
                                 config=config))
    started = time.time()
    loop.own_attention = getattr(_base_llm(model).config, "_attn_implementation", None)
    with _training_attention(model, config.train_attention, torch.cuda.is_available()) as attention:
        stopped = loop.run(start.step, stop_after, progress)
    if stopped is not None:
        return {"stopped_at": stopped, "checkpoint": str(latest_checkpoint(out))}
    train_seconds = time.time() - started
    tokens = int(accelerator.reduce(torch.tensor(loop.tokens, device=accelerator.device), "sum"))
    metrics: dict = {"steps": config.steps, "train_seconds": round(train_seconds, 3), "processes": processes,
                     "train_tokens": tokens, "tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
                     "precision": precision, "train_attention": attention,
                     "torch_threads": torch.get_num_threads(), "resumed_from": start.step,
                     "train_episodes": len(train_eps), "validation_episodes": len(val_eps),
                     "hindsight_train_episodes": len(hindsight_train) if config.hindsight_share else 0,
                     "final_running_loss": loop.running}
    return _finish(accelerator, objective, spec, (train_eps, val_eps, hindsight_val), config, out, split, metrics,
                   loop.curve, loop.growth)


def _optimization(accelerator, start: _Start, config: GroundingConfig):
    """The objective, optimizer and schedule of a run, restored from its checkpoint when resuming."""
    start.model.train()
    lr = config.full_lr if config.finetune == "full" else config.lr
    optimizer = make_optimizer(start.model, lr, config.io_lr, config.weight_decay)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, config.steps)
    if start.checkpoint is not None:
        restore_training_checkpoint(start.checkpoint, optimizer, scheduler, start.state)
    objective, optimizer = accelerator.prepare(GroundingObjective(start.model), optimizer)
    return objective, optimizer, scheduler


class _TrainingLoop:
    """The optimisation steps of one session, with periodic checkpoints."""

    def __init__(self, accelerator, objective, optimizer, scheduler, sampler: ExampleSampler,
                 config: GroundingConfig, out: Path, split: dict, curve: list[dict], growth: list[dict],
                 measure: Callable[[GroundedLM], dict]):
        self.accelerator, self.objective, self.optimizer, self.scheduler = accelerator, objective, optimizer, scheduler
        self.sampler, self.config, self.out, self.split = sampler, config, out, split
        self.model = accelerator.unwrap_model(objective).model
        self.running: dict[str, float] = {}
        self.tokens = 0  # non-padding tokens through the model in this process (for tokens/s)
        self.curve = curve  # the global batch's mean loss per step (every process holds it)
        self.growth, self.measure = growth, measure  # held-out figures at config.measure_at
        self.own_attention: str | None = None  # the backbone's kernel, which measuring (generation) uses

    def run(self, first_step: int, stop_after: int | None, progress: bool) -> int | None:
        """Steps ``first_step``..``config.steps``; returns the step a time-sliced session
        stopped at (after checkpointing it), or None when the run is complete."""
        from tqdm.auto import tqdm

        config, accelerator = self.config, self.accelerator
        bar = tqdm(range(first_step, config.steps), initial=first_step, total=config.steps, desc="grounding",
                   disable=not (progress and accelerator.is_main_process))
        for step in bar:
            local = config.micro_batches // accelerator.num_processes
            # micro-batch i of the global batch runs on process i % N, so its examples
            # do not depend on how many processes share the step
            total = sum(self._micro_step(step, k * accelerator.num_processes + accelerator.process_index)
                        for k in range(local))
            total = accelerator.reduce(torch.tensor(total, dtype=torch.float64, device=accelerator.device), "sum")
            self.curve.append({"step": step + 1, "loss": float(total) / config.micro_batches})
            bar.set_postfix({k[:4]: f"{v:.3f}" for k, v in self.running.items()})
            done = step + 1
            if done in config.measure_at:
                self._measure(done)
            stopping = stop_after is not None and done >= stop_after and done < config.steps
            periodic = config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps
            if periodic or stopping:
                with full_weights(accelerator, self.objective):
                    if accelerator.is_main_process:
                        save_training_checkpoint(self.out, done, self.model, self.optimizer, self.scheduler,
                                                 {"config": config.to_json(), "split": self.split,
                                                  "curve": self.curve, "growth": self.growth},
                                                 config.keep_checkpoints)
            accelerator.wait_for_everyone()
            if stopping:
                bar.close()
                return done
        bar.close()
        return None

    def _measure(self, step: int) -> None:
        """The held-out figures of the model as it is after ``step``, with training's
        random state and mode left as they were, so a measured run trains the same
        weights as an unmeasured one."""
        started = time.time()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), _attention(self.model, self.own_attention):
            found = self.measure(self.model)
        self.model.train()
        self.growth.append({"step": step, **{k: found[k] for k in GROWTH_FIGURES if k in found},
                            "eval_seconds": round(time.time() - started, 1)})

    def _micro_step(self, step: int, micro: int) -> float:
        """Forward and backward of micro-batch ``micro`` of the step's global batch; its loss."""
        config, accelerator = self.config, self.accelerator
        rng = step_rng(config.seed, step, micro)
        task = choose_task(config.weights, rng)
        examples = self.sampler.batch(task, rng, config.batch_tokens, config.max_batch_size)
        batch = collate(examples, self.model.pad_token_id)
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        self.tokens += int(batch["attention_mask"].sum())
        # accumulate(): no gradient sync, no optimizer step and a loss divided by this
        # process's micro-batch count until its last one (DeepSpeed counts the same
        # way); the gradient all-reduce then averages over processes
        with accelerator.accumulate(self.objective):
            with accelerator.autocast():
                losses = self.objective(batch)
            accelerator.backward(losses["total"])
            if accelerator.sync_gradients:
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(self.objective.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        value = float(losses["total"].detach())
        self.running[task] = value if task not in self.running else 0.9 * self.running[task] + 0.1 * value
        return value


def _held_out_metrics(model: GroundedLM, *, spec, val_eps: list, determined: list, config: GroundingConfig) -> dict:
    """Every held-out figure of ``model`` (empty without held-out episodes)."""
    if not val_eps:
        return {}
    horizon = config.generation_max_steps or min(2 * config.max_trajectory_steps, spec.max_episode_steps)
    return evaluate_grounding(model, spec, val_eps, bf16=_precision(config) == "bf16", seed=config.seed,
                              window=config.max_trajectory_steps, horizon=horizon,
                              batch_size=config.eval_batch_size, max_episodes=config.eval_episodes,
                              max_new_tokens=config.explanation_max_tokens, determined=determined)


def _finish(accelerator, objective, spec, episodes: tuple[list, list, list], config: GroundingConfig, out: Path,
            split: dict, metrics: dict, curve: list[dict], growth: list[dict]) -> dict:
    """Save the model, measure it on the held-out episodes, write the metrics and drop
    the checkpoints."""
    model = accelerator.unwrap_model(objective).model
    # Every process evaluates (identical work): under ZeRO-3 each forward gathers the
    # sharded weights collectively, so rank 0 cannot run one alone.
    with full_weights(accelerator, objective):
        if accelerator.is_main_process:
            model.save(out / "model")
            write_json_atomic(out / "grounding_config.json", config.to_json())
            write_json_atomic(out / "split.json", split)
    train_eps, val_eps, determined = episodes
    if val_eps:
        eval_started = time.time()
        metrics.update(_held_out_metrics(model, spec=spec, val_eps=val_eps, determined=determined, config=config))
        metrics["eval_seconds"] = round(time.time() - eval_started, 1)
        if config.measure_at:
            growth = [*growth, {"step": config.steps, **{k: metrics[k] for k in GROWTH_FIGURES if k in metrics},
                                "eval_seconds": metrics["eval_seconds"]}]
            metrics["growth"] = growth
        if config.dynamics_baseline_steps > 0:
            held_out = held_out_transitions(val_eps, HELD_OUT_TRANSITIONS, config.seed)  # dynamics_mse's
            metrics.update(mlp_dynamics_baseline(train_eps, held_out, spec.action_dim, spec.discrete,
                                                 config.dynamics_baseline_steps, config.seed))
    if accelerator.is_main_process:
        write_curve(out / CURVE_FILE, curve)
        if growth:
            write_curve(out / GROWTH_FILE, growth)
        write_json_atomic(out / "metrics.json", json_safe(metrics))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return metrics


def _backbone_reference(backbone: str) -> str:
    """Embedded names stay names; paths become absolute so a checkpoint finds its base."""
    return backbone if str(backbone) in EMBEDDED_MODELS else str(Path(backbone).expanduser().resolve())
