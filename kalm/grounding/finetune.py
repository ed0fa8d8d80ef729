"""Grounding: fine-tune a causal LM on the four tasks, then measure it on held-out data.

One run mixes the tasks (dynamics, explanation, generation, goal) with configurable
weights: each micro-batch is one task, drawn by weight, and packs as many examples
as fit a token budget. LoRA on the attention and MLP projections by default
(``finetune="full"`` trains every LLM weight); the new I/O layers always train.

``accelerate`` makes the same code run on CPU, one GPU or several. Precision is bf16
on GPU; on CPU it is bf16 autocast when the CPU has native bf16 (AVX512-BF16/AMX),
otherwise fp32. Measured on the shared 2-core box, SmolLM2-135M + LoRA, one thread,
a 16x30-token explanation batch: fp32 2.6 s/step, bf16 autocast 2.25 s/step. Torch
threads default to the idle cores: two threads beside one busy process ran 10x
slower (OpenMP threads spinning against each other).

Default config, measured (real CLEVR data, 1,600 expert episodes, 1,440 for training;
2 idle cores, inside a fresh ``kalm run``): 400 steps in 643 s (313 tokens/s, eager
attention) plus a 76 s evaluation; held-out dynamics MSE 7.3x below the
copy-the-state baseline, generated rollouts reach their goal 12 % of the time,
explanation accuracy 5 % (14 % naming the same goal). On one H200 the earlier 300-step
config trained in 80 s (1,891 tokens/s); the step rate there is bound by kernel
launches, so the GPU preset (``clevr-gpu``) uses 4x larger batches at the same
~4 steps/s.

Multi-GPU with DeepSpeed ZeRO-3 (parameters sharded; CPU offload of optimizer and
weights)::

    accelerate launch --config_file kalm/grounding/configs/accelerate_zero3.yaml \\
        -m kalm.cli ground --env clevr --data data/clevr.h5 --llm PATH --out runs/ground --full

(the YAML points at ``configs/zero3.json``; edit ``num_processes`` to the GPU count).

Checkpoints (every ``checkpoint_every`` steps, the last ``keep_checkpoints`` kept)
hold the model (safetensors), the optimizer (``torch.load(weights_only=True)``), the
scheduler and RNG state (JSON / safetensors). Batches are a function of the step
number, so a killed run resumed with ``resume=True`` follows the same path and ends
at the same step (CPU, one GPU, DDP; not under DeepSpeed, whose optimizer state is
sharded).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from kalm.files import write_atomic, write_json_atomic
from kalm.grounding.backbone import resolve_backbone
from kalm.grounding.data import ExampleSampler, choose_task, prepare_episodes, split_episodes, step_rng
from kalm.grounding.metrics import dynamics_mse, explanation_accuracy, generation_success
from kalm.grounding.model import DEFAULT_LORA_TARGETS, GroundedLM, GroundedLMConfig, NormStats, native_bf16
from kalm.grounding.prompts import IGNORE_INDEX, TASKS, collate
from kalm.threads import set_torch_threads

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class GroundingConfig:
    """Training and evaluation settings; the defaults fit 20 minutes on a 2-core CPU
    with SmolLM2-135M (see the module docstring for the measurements)."""

    # 400 steps: with eager attention on CPU they cost about what 300 did with sdpa.
    steps: int = 400
    batch_tokens: int = 640  # padded tokens per micro-batch
    max_batch_size: int = 48
    grad_accum: int = 1
    lr: float = 1e-3  # LoRA (or full) weights
    io_lr: float = 2e-3  # the new encoders and heads
    full_lr: float = 5e-5  # used instead of lr with finetune="full"
    weight_decay: float = 0.0
    warmup_steps: int = 15
    max_grad_norm: float = 1.0
    finetune: str = "lora"
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    io_hidden: int = 256
    # Rollout generation gets 60 % of the micro-batches because imagination is what it
    # feeds. Against (0.5, 3.0, 1.0, 0.5) at the same 300 CPU steps (measured on CLEVR):
    # imagined rollouts reaching their goal 7 % -> 31 %, KALM easy success 23 % -> 63 %,
    # explanation 12 % -> 4 % exact.
    task_weights: tuple[tuple[str, float], ...] = (
        ("dynamics", 0.5), ("explanation", 1.0), ("generation", 3.0), ("goal", 0.5))
    max_trajectory_steps: int = 16
    validation_fraction: float = 0.1
    precision: str = "auto"  # auto | bf16 | fp32
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    eval_episodes: int = 100
    eval_batch_size: int = 32
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
        for name in ("steps", "batch_tokens", "max_batch_size", "grad_accum", "max_trajectory_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.task_weights)

    def to_json(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["task_weights"] = [list(p) for p in self.task_weights]
        return d

    @classmethod
    def from_json(cls, data: dict) -> GroundingConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["lora_targets"] = tuple(values.get("lora_targets", DEFAULT_LORA_TARGETS))
        if "task_weights" in values:
            values["task_weights"] = tuple((str(n), float(w)) for n, w in values["task_weights"])
        return cls(**values)


class GroundingObjective(torch.nn.Module):
    """The losses of one batch; a module so DDP/DeepSpeed see every parameter used.

    state: MSE of the predicted change in units of the per-step change; action: CE
    (discrete) or MSE of normalised actions; done: BCE; text: CE on instruction
    tokens. The LM head runs only where text is supervised.
    """

    def __init__(self, model: GroundedLM):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m = self.model
        embeds = m.embed_sequence(batch["input_ids"], batch["states"], batch["actions"])
        hidden, _ = m(embeds, batch["attention_mask"], batch["position_ids"])
        losses: dict[str, torch.Tensor] = {}
        sm = batch["state_mask"]
        if sm.any():
            # One unit for every state target, the goal's too (its change from s_0 in
            # per-step units). Measured on CLEVR-Robot: measuring the goal in units of the
            # state's spread instead (same seed and batches) dropped held-out dynamics
            # from 7.0x to 3.3x better than copying; the shared head then had to emit two
            # scales. On Meta-World the goal's per-step units make its loss ~1000x the
            # others (a separate goal head is the fix still to measure).
            target = (batch["state_targets"][sm] - batch["state_reference"][sm]) / m.io.delta_std
            losses["state"] = torch.nn.functional.mse_loss(m.predict_state_change(hidden[sm]), target)
        am = batch["action_mask"]
        if am.any():
            out = m.io.action_head(hidden[am].float())
            if m.config.discrete:
                losses["action"] = torch.nn.functional.cross_entropy(out, batch["action_targets"][am])
            else:
                target = (batch["action_targets"][am] - m.io.action_mean) / m.io.action_std
                losses["action"] = torch.nn.functional.mse_loss(out, target)
        dm = batch["done_mask"]
        if dm.any():
            losses["done"] = torch.nn.functional.binary_cross_entropy_with_logits(
                m.predict_done(hidden[dm]), batch["done_targets"][dm])
        tm = batch["token_targets"] != IGNORE_INDEX
        if tm.any():
            logits = m.token_logits(hidden[tm]).float()
            losses["text"] = torch.nn.functional.cross_entropy(logits, batch["token_targets"][tm])
        losses["total"] = sum(losses.values())
        return losses


def _precision(config: GroundingConfig) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if native_bf16() else "fp32"


@contextmanager
def _training_attention(model: GroundedLM, choice: str, on_gpu: bool):
    """Train with the chosen attention kernel, then give the model back its own.

    Why eager on CPU: PyTorch's CPU flash-attention backward costs about 11 ms per
    layer on our short sequences (~40 tokens), a quarter of a SmolLM2 LoRA step; the
    plain matmul-softmax path does the same maths without it. Measured on 2 cores with
    bf16 autocast (``python -m benchmarks --skip env generation offline``, side by
    side): 316 tokens/s with sdpa, 439 with eager (1.39x); in fp32 1.11x. Generation
    keeps sdpa, which is faster there (one new token per step).
    """
    implementation = "eager" if choice == "auto" and not on_gpu else (None if choice == "auto" else choice)
    base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    previous = getattr(base.config, "_attn_implementation", None)
    if implementation is None or implementation == previous or not hasattr(base, "set_attn_implementation"):
        yield previous
        return
    base.set_attn_implementation(implementation)
    try:
        yield implementation
    finally:
        base.set_attn_implementation(previous)


def _optimizer(model: GroundedLM, config: GroundingConfig) -> torch.optim.Optimizer:
    io = [p for p in model.io.parameters() if p.requires_grad]
    llm = [p for p in model.llm.parameters() if p.requires_grad]
    lr = config.full_lr if config.finetune == "full" else config.lr
    return torch.optim.AdamW([{"params": llm, "lr": lr}, {"params": io, "lr": config.io_lr}],
                             weight_decay=config.weight_decay)


def _cosine_with_warmup(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------- checkpoints
def latest_checkpoint(out: Path) -> Path | None:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def _save_checkpoint(out: Path, step: int, model: GroundedLM, optimizer, scheduler, config: GroundingConfig,
                     split: dict) -> Path:
    from safetensors.torch import save

    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}-", dir=root))
    try:
        model.save(staging / "model")
        # serialised in memory and written with plain file I/O, so a full disk is an
        # OSError naming the file (torch.save and safetensors raise their own types)
        write_atomic(staging / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
        write_atomic(staging / "rng.safetensors", lambda f: f.write(save({"torch_rng": torch.get_rng_state()})))
        state = {"step": step, "config": config.to_json(), "scheduler": scheduler.state_dict(), "split": split}
        write_json_atomic(staging / TRAINER_STATE, state)
        staging.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, spec, config: GroundingConfig, backbone: str):
    state = json.loads((path / TRAINER_STATE).read_text())
    saved = GroundingConfig.from_json(state["config"])
    if saved != config:
        diff = [f.name for f in fields(GroundingConfig) if getattr(saved, f.name) != getattr(config, f.name)]
        raise ValueError(f"cannot resume from {path}: its training config differs in {', '.join(diff)}")
    model = GroundedLM.load(path / "model", spec=spec, trainable=True, backbone=backbone)
    return model, state


# ---------------------------------------------------------------- the run
def _accelerator(**kwargs):
    """An ``Accelerator``; in a single process, one left by an earlier run with another
    precision is reset first (accelerate keeps its state process-wide and otherwise
    refuses a second run in the same process, e.g. a library user grounding twice)."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or PartialState().num_processes != 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def train_grounding(spec, dataset, backbone: str, out: str | os.PathLike, config: GroundingConfig = GroundingConfig(),
                    resume: bool = False, llm=None, tokenizer=None, progress: bool = True,
                    stop_after: int | None = None) -> dict:
    """Ground ``backbone`` on ``dataset`` for ``spec``; writes ``out/model``,
    ``out/metrics.json`` and checkpoints, and returns the metrics.

    ``llm``/``tokenizer`` may be passed pre-built (tests use a tiny random model).
    ``stop_after`` ends this session after that many steps with a checkpoint (a
    time-sliced run); ``resume=True`` continues it on the same schedule.
    """
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    if dataset.env != spec.name:
        raise ValueError(f"the dataset was collected in env {dataset.env!r}, not {spec.name!r}")
    out = Path(out)
    if llm is None:
        resolve_backbone(backbone)  # a bad --llm is named before anything else starts
    set_torch_threads(config.num_threads or None)
    precision = _precision(config)
    accelerator = _accelerator(
        mixed_precision="bf16" if precision == "bf16" else "no",
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    episodes = prepare_episodes(dataset, spec)
    from accelerate.utils import DistributedType

    if resume and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("resume is not supported under DeepSpeed (its optimizer state is sharded across processes); "
                         "checkpoints there hold the model weights only")
    checkpoint = latest_checkpoint(out) if resume else None
    if not resume and latest_checkpoint(out) is not None:
        raise ValueError(f"{out} holds checkpoints of an unfinished run: resume it or choose another output directory")
    if resume and checkpoint is None and (out / "model").exists():
        raise ValueError(f"nothing to resume in {out}: the run finished (see {out / 'model'})")
    if checkpoint is not None:
        model, state = _load_checkpoint(checkpoint, spec, config, backbone)
        split, start_step = state["split"], int(state["step"])
    else:
        train_idx, val_idx = split_episodes(episodes, config.validation_fraction, config.seed)
        split = {"train": train_idx, "validation": val_idx}
        torch.manual_seed(config.seed)
        train_eps = [episodes[i] for i in train_idx]
        stats = NormStats.from_arrays([e.observations for e in train_eps], [e.actions for e in train_eps],
                                      spec.discrete)
        model_config = GroundedLMConfig(
            env=spec.name, state_dim=spec.state_dim, action_dim=spec.action_dim, discrete=spec.discrete,
            backbone=_backbone_reference(backbone), finetune=config.finetune, lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, lora_targets=config.lora_targets,
            io_hidden=config.io_hidden)
        model = GroundedLM.create(model_config, stats, llm=llm, tokenizer=tokenizer)
        start_step = 0
    train_eps = [episodes[i] for i in split["train"]]
    val_eps = [episodes[i] for i in split["validation"]]
    sampler = ExampleSampler(model.prompts, train_eps, config.max_trajectory_steps)

    model.train()
    optimizer = _optimizer(model, config)
    scheduler = _cosine_with_warmup(optimizer, config.warmup_steps, config.steps)
    if checkpoint is not None:
        from safetensors.torch import load_file

        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(load_file(str(checkpoint / "rng.safetensors"))["torch_rng"])
    objective = GroundingObjective(model)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"grounding {spec.name} on {len(train_eps)} episodes ({len(val_eps)} held out), "
                      f"{config.finetune}, {trainable / 1e6:.2f}M trainable, {precision}, "
                      f"steps {start_step}->{config.steps}")

    weights = config.weights
    running: dict[str, float] = {}
    tokens = 0  # non-padding tokens through the model in this process (for tokens/s)
    started = time.time()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="grounding",
               disable=not (progress and accelerator.is_main_process))
    with _training_attention(model, config.train_attention, torch.cuda.is_available()) as attention:
        for step in bar:
            for micro in range(config.grad_accum):
                rng = step_rng(config.seed, step, micro, accelerator.process_index)
                task = choose_task(weights, rng)
                examples = sampler.batch(task, rng, config.batch_tokens, config.max_batch_size)
                batch = collate(examples, model.pad_token_id)
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                tokens += int(batch["attention_mask"].sum())
                # accumulate(): no gradient sync, no optimizer step and a loss divided by
                # grad_accum until the last micro-batch (DeepSpeed counts the same way)
                with accelerator.accumulate(objective):
                    with accelerator.autocast():
                        losses = objective(batch)
                    accelerator.backward(losses["total"])
                    if accelerator.sync_gradients:
                        if config.max_grad_norm:
                            accelerator.clip_grad_norm_(objective.parameters(), config.max_grad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                value = float(losses["total"].detach())
                running[task] = value if task not in running else 0.9 * running[task] + 0.1 * value
            bar.set_postfix({k[:4]: f"{v:.3f}" for k, v in running.items()})
            done = step + 1
            stopping = stop_after is not None and done >= stop_after and done < config.steps
            periodic = config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps
            if periodic or stopping:
                with _full_weights(accelerator, objective):
                    if accelerator.is_main_process:
                        _save_checkpoint(out, done, accelerator.unwrap_model(objective).model, optimizer, scheduler,
                                         config, split)
            accelerator.wait_for_everyone()
            if stopping:
                bar.close()
                return {"stopped_at": done, "checkpoint": str(latest_checkpoint(out))}
    bar.close()
    train_seconds = time.time() - started

    model = accelerator.unwrap_model(objective).model
    metrics: dict = {"steps": config.steps, "train_seconds": round(train_seconds, 3),
                     "train_tokens": tokens, "tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
                     "precision": precision, "train_attention": attention,
                     "torch_threads": torch.get_num_threads(), "resumed_from": start_step,
                     "train_episodes": len(train_eps), "validation_episodes": len(val_eps),
                     "final_running_loss": running}
    # Every process evaluates (identical work): under ZeRO-3 each forward gathers the
    # sharded weights collectively, so rank 0 cannot run one alone.
    with _full_weights(accelerator, objective):
        if accelerator.is_main_process:
            model.save(out / "model")
            write_json_atomic(out / "grounding_config.json", config.to_json())
            write_json_atomic(out / "split.json", split)
    if val_eps:
        eval_started = time.time()
        metrics.update(evaluate_grounding(model, spec, val_eps, config))
        metrics["eval_seconds"] = round(time.time() - eval_started, 1)
    if accelerator.is_main_process:
        write_json_atomic(out / "metrics.json", _json_safe(metrics))
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    return metrics


def evaluate_grounding(model: GroundedLM, spec, val_eps, config: GroundingConfig) -> dict:
    """Held-out metrics (see :mod:`kalm.grounding.metrics`)."""
    model.eval()
    with torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16,
                        enabled=_precision(config) == "bf16"):
        metrics = dynamics_mse(model, val_eps, seed=config.seed)
        try:
            val_sampler = ExampleSampler(model.prompts, val_eps, config.max_trajectory_steps, validation=True)
        except ValueError:
            return metrics  # no successful held-out episode: nothing to explain or generate
        metrics.update(explanation_accuracy(model, spec, val_sampler, config.eval_batch_size,
                                            config.explanation_max_tokens, config.eval_episodes))
        horizon = config.generation_max_steps or min(2 * config.max_trajectory_steps, spec.max_episode_steps)
        metrics.update(generation_success(model, val_sampler, horizon, config.eval_batch_size, config.eval_episodes,
                                          config.seed))
    return metrics


def _full_weights(accelerator, module):
    """A context in which ``module`` holds its whole weights: under DeepSpeed ZeRO-3
    they are sharded across processes and gathered collectively (every process must
    enter); otherwise nothing to do."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return nullcontext()


def _backbone_reference(backbone: str) -> str:
    """Embedded names stay names; paths become absolute so a checkpoint finds its base."""
    from kalm.grounding.backbone import EMBEDDED_MODELS

    return backbone if str(backbone) in EMBEDDED_MODELS else str(Path(backbone).expanduser().resolve())


def _json_safe(value):
    """``value`` with non-finite floats as None (a diverged loss must not lose the run's
    metrics file to strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
