"""Language-conditioned offline RL on episode files, with d3rlpy as the learner.

A training run writes one *policy directory*::

    config.json      what ran: TrainConfig, env, encoder, data files, steps done, time
    algo.json        the d3rlpy algorithm config (JSON, d3rlpy's own serialisation)
    model.pt         final network (+ optimiser) state dicts, loaded weights-only
    curve.csv        the training losses at every step
    checkpoint/      the latest checkpoint: model-<step>.pt and state.json (step, RNG states,
                     the name of its weights file; written last)

The loop is ours rather than d3rlpy's ``fit`` so that batches can mix real and
imaginary data in a fixed ratio (:mod:`kalm.offline.buffers`), checkpoints hold the
sampler's RNG state (a resumed run continues the same batch sequence and ends at the
same step count), and nothing is written outside the policy directory (``fit``
creates ``d3rlpy_logs/`` by default).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
import torch
from tqdm.auto import tqdm

from kalm.data.episodes import EpisodeDataset, load_episodes
from kalm.envs import get_spec
from kalm.envs.spec import EnvSpec
from kalm.files import make_dirs, read_curve, read_json, write_curve, write_json_atomic
from kalm.offline.algos import SEQUENCE_ALGOS, build_algo_config
from kalm.offline.buffers import (
    EpisodeTable,
    MixedSampler,
    TrajectorySampler,
    TransitionTable,
    build_replay_buffer,
    relabel_rewards,
    stored_rewards,
)
from kalm.offline.config import TrainConfig
from kalm.offline.encoder import shared_encoder
from kalm.offline.policy_files import (
    ALGO_FILE,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CPU,
    CURVE_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_weights,
    save_algo_config,
    save_weights,
)
from kalm.threads import set_torch_threads


@dataclasses.dataclass(frozen=True)
class TrainResult:
    policy_dir: Path
    steps: int
    seconds: float
    final_loss: dict[str, float]


def train(
    data: str | Path | Sequence[str | Path],
    out: str | Path,
    config: TrainConfig | None = None,
    imaginary: Sequence[str | Path] = (),
    resume: bool = False,
    embedding_cache: str | Path | None = None,
    progress: bool = True,
    threads: int | None = 1,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a policy on the real episode file(s) ``data`` (plus ``imaginary`` ones).

    ``out`` must be empty or absent unless ``resume`` is set, in which case the run
    continues from ``out/checkpoint`` with the stored configuration (which must match
    ``config``) and stops at ``config.steps`` in total.

    ``threads`` sets torch's intra-op threads (``None`` leaves it alone). One is the
    default because the networks are tiny: on a 2-core machine shared with other
    work, two threads made a CQL step 20x slower (185 ms vs 8 ms) from contention.

    ``stop_after`` ends this invocation at that step (after checkpointing it) without
    finishing the run, for time-sliced jobs; ``--resume`` carries on from there.
    """
    if threads is not None:
        set_torch_threads(threads)
    out = Path(out)
    inputs = _load_inputs(data, imaginary)
    spec = inputs.spec
    config = (config or TrainConfig()).for_action_space(spec.discrete)
    description = _run_description(config, spec, inputs.data_paths, inputs.imaginary_paths)
    state = _prepare_out_dir(out, description, resume)

    batches = _build_batches(inputs, config, embedding_cache)
    algo = _build_algo(config, spec, batches)
    save_algo_config(algo, out / ALGO_FILE)
    rng = np.random.default_rng(config.seed)
    done = _restore_checkpoint(out, state, algo, rng)
    description.update(
        observation_dim=int(batches.observation_shape[0]),
        state_dim=spec.state_dim,
        embedding_dim=batches.embedding_dim,
        action_size=spec.action_dim,
        real_transitions=len(batches.real),
        imaginary_transitions=sum(len(t) for t in batches.imaginary),
        batch_real=batches.sampler.n_real,
        batch_imaginary=batches.sampler.n_imaginary,
        completed_steps=done.step,
        train_seconds=done.seconds,
    )
    if isinstance(batches.real, EpisodeTable):
        # what a sequence model is asked for when it acts: the best return in the real data
        description["target_return"] = max(float(np.sum(ep.rewards)) for ep in batches.real.episodes)
    write_json_atomic(out / CONFIG_FILE, description)

    last_step = config.steps if stop_after is None else min(config.steps, stop_after)
    step, seconds, loss = _run_steps(out, config, algo, batches.sampler, rng, done, last_step, progress)
    return _finish(out, config, algo, description, step, seconds, loss)


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """The episode files of a run, loaded and checked against one environment."""

    data_paths: list[Path]
    imaginary_paths: list[Path]
    spec: EnvSpec
    real: EpisodeDataset
    imaginary: list[EpisodeDataset]


def _load_inputs(data: str | Path | Sequence[str | Path], imaginary: Sequence[str | Path]) -> _Inputs:
    """Load every file; the first real one names the environment the others must share."""
    data_paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(p) for p in data]
    imaginary_paths = [Path(p) for p in imaginary]
    if not data_paths:
        raise ValueError("no real episode file given")
    real_sets = _load_all(data_paths, None)
    spec = get_spec(real_sets[0].env)
    real = _merge(real_sets)
    fake_sets = _load_all(imaginary_paths, spec)
    assert real is not None
    return _Inputs(data_paths, imaginary_paths, spec, real, fake_sets)


def _load_all(paths: Sequence[str | Path], spec: EnvSpec | None) -> list[EpisodeDataset]:
    datasets = []
    for path in paths:
        dataset = load_episodes(path, spec)
        spec = spec or get_spec(dataset.env)
        datasets.append(dataset)
    return datasets


def _merge(datasets: list[EpisodeDataset]) -> EpisodeDataset | None:
    if not datasets:
        return None
    if len(datasets) == 1:
        return datasets[0]
    episodes = tuple(ep for d in datasets for ep in d.episodes)
    return EpisodeDataset(env=datasets[0].env, episodes=episodes, metadata={"merged": [d.metadata for d in datasets]})


def _run_description(config: TrainConfig, spec: EnvSpec, data: Sequence[Path], imaginary: Sequence[Path]) -> dict:
    return {
        "train": config.to_json(),
        "env": spec.name,
        "encoder": config.encoder,
        "data": [str(p) for p in data],
        "imaginary": [str(p) for p in imaginary],
        "d3rlpy_version": d3rlpy.__version__,
    }


@dataclasses.dataclass(frozen=True)
class _Batches:
    """The tables a run learns from (transitions, or episodes for a sequence model)
    and the sampler that mixes them."""

    real: TransitionTable | EpisodeTable
    imaginary: list[TransitionTable] | list[EpisodeTable]
    sampler: MixedSampler | TrajectorySampler
    observation_shape: Sequence[int]
    embedding_dim: int


def _build_batches(inputs: _Inputs, config: TrainConfig, embedding_cache: str | Path | None) -> _Batches:
    """Encode the instructions, label the rewards and build the tables and sampler."""
    spec = inputs.spec
    encoder = shared_encoder(config.encoder, embedding_cache)
    reward_fn = stored_rewards if config.reward == "stored" else relabel_rewards(spec, config.reward)
    sequence = config.algo in SEQUENCE_ALGOS
    fake_sets = inputs.imaginary
    sources = [_merge(fake_sets)] if fake_sets and config.imaginary_mix == "pooled" else fake_sets
    buffers = [build_replay_buffer(d, spec, encoder.encode, reward_fn, sequence) for d in [inputs.real, *sources]]
    observation_shape = buffers[0].dataset_info.observation_signature.shape[0]
    if sequence:
        real, *fake = [EpisodeTable(b.episodes) for b in buffers]
        sampler = TrajectorySampler(real, fake, config.resolved_batch_size(), config.imaginary_ratio, config.dt_context)
        return _Batches(real, fake, sampler, observation_shape, encoder.dim)
    real, *fake = [TransitionTable.from_replay_buffer(b) for b in buffers]
    sampler = MixedSampler(real, fake, config.resolved_batch_size(), config.imaginary_ratio)
    return _Batches(real, fake, sampler, observation_shape, encoder.dim)


def _build_algo(config: TrainConfig, spec: EnvSpec, batches: _Batches) -> d3rlpy.base.LearnableBase:
    """The d3rlpy learner with freshly seeded networks (observations standardised with
    the real data's statistics when ``config.standardize``)."""
    scaler = None
    if config.standardize:
        scaler = d3rlpy.preprocessing.StandardObservationScaler(
            mean=batches.real.observations.mean(axis=0), std=batches.real.observations.std(axis=0)
        )
    d3rlpy.seed(config.seed)
    algo = build_algo_config(config, spec, scaler).create(device=CPU)
    algo.create_impl(batches.observation_shape, spec.action_dim)
    return algo


@dataclasses.dataclass(frozen=True)
class _Progress:
    """Where a run stands: steps done, seconds spent on them, the loss curve so far."""

    step: int
    seconds: float
    curve: list[dict[str, float]]


def _restore_checkpoint(
    out: Path, state: dict | None, algo: d3rlpy.base.LearnableBase, rng: np.random.Generator
) -> _Progress:
    """Put the checkpoint ``state`` (if any) back into ``algo``, the sampler's ``rng``
    and torch's RNG, and say where the run stands."""
    if state is None:
        return _Progress(step=0, seconds=0.0, curve=[])
    step, seconds = int(state["step"]), float(state["seconds"])
    load_weights(algo, out / CHECKPOINT_DIR / _checkpoint_model(state))
    try:
        rng.bit_generator.state = state["numpy_rng"]
        _torch_rng_from_json(state["torch_rng"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"checkpoint state {out / CHECKPOINT_DIR / STATE_FILE}: unusable RNG state "
                         f"({type(exc).__name__}: {exc})") from None
    algo.set_grad_step(step)
    curve: list[dict[str, float]] = []
    if (out / CURVE_FILE).exists():
        curve = [row for row in read_curve(out / CURVE_FILE) if row["step"] <= step]
    return _Progress(step=step, seconds=seconds, curve=curve)


def _run_steps(
    out: Path,
    config: TrainConfig,
    algo: d3rlpy.base.LearnableBase,
    sampler: MixedSampler | TrajectorySampler,
    rng: np.random.Generator,
    done: _Progress,
    last_step: int,
    progress: bool,
) -> tuple[int, float, dict[str, float]]:
    """Gradient steps from ``done.step`` to ``last_step``, checkpointing every
    ``config.checkpoint_every`` steps and at ``last_step``. Return the step reached,
    the seconds spent in all (``done.seconds`` included) and the last step's losses."""
    step, seconds, curve = done.step, done.seconds, done.curve
    started = time.perf_counter()
    loss: dict[str, float] = {}
    # closed on errors too, so an error message starts on a line of its own
    with tqdm(total=config.steps, initial=step, desc=f"train {config.algo}", disable=not progress,
              unit="step") as bar:
        while step < last_step:
            loss = {k: float(v) for k, v in algo.update(sampler.sample(rng)).items()}
            step += 1
            curve.append({"step": step, **loss})
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix({k: f"{v:.3g}" for k, v in loss.items()})
            if step % config.checkpoint_every == 0 or step == last_step:
                elapsed = seconds + time.perf_counter() - started
                _save_checkpoint(out, algo, rng, step, elapsed, curve)
    seconds += time.perf_counter() - started
    return step, seconds, loss


def _finish(out: Path, config: TrainConfig, algo: d3rlpy.base.LearnableBase, description: dict, step: int,
            seconds: float, loss: dict[str, float]) -> TrainResult:
    """Write the final weights once the run has all its steps (a run stopped early has
    only its checkpoint), then the steps and time done into the run's description."""
    if step >= config.steps:
        save_weights(algo, out / MODEL_FILE)
    description.update(completed_steps=step, train_seconds=round(seconds, 3))
    write_json_atomic(out / CONFIG_FILE, description)
    return TrainResult(policy_dir=out, steps=step, seconds=seconds, final_loss=loss)


def _rng_to_json(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _torch_rng_to_json() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")


def _torch_rng_from_json(text: str) -> None:
    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy()))


def _save_checkpoint(
    out: Path, algo: d3rlpy.base.LearnableBase, rng: np.random.Generator, step: int, seconds: float, curve: list
) -> None:
    """Curve and weights first, the state file last: the state file names the step the
    other two belong to, so a kill in between leaves the previous consistent state."""
    # The weights go to a file named by the step, so a kill after they are written but
    # before the state file is replaced leaves the previous state next to its own
    # weights (one shared model.pt would then hold a later step than the state says).
    model_name = f"model-{step:09d}.pt"
    write_curve(out / CURVE_FILE, curve)
    save_weights(algo, out / CHECKPOINT_DIR / model_name)
    write_json_atomic(
        out / CHECKPOINT_DIR / STATE_FILE,
        {"step": step, "seconds": round(seconds, 3), "numpy_rng": _rng_to_json(rng), "torch_rng": _torch_rng_to_json(),
         "model": model_name},
    )
    for old in (out / CHECKPOINT_DIR).glob("model*.pt"):
        if old.name != model_name:
            old.unlink(missing_ok=True)


def _prepare_out_dir(out: Path, description: dict, resume: bool) -> dict | None:
    """Refuse to overwrite a run; on resume, check it is the same run and return its
    checkpoint state (``None`` when it never reached a checkpoint)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a policy directory")
    existing = out.exists() and any(out.iterdir())
    if not resume:
        if existing:
            raise FileExistsError(f"{out} is not empty; pass --resume to continue that run or choose another --out")
        make_dirs(out)
        return None
    if not existing:
        raise FileNotFoundError(f"nothing to resume in {out}")
    if not (out / CONFIG_FILE).exists() and not (out / CHECKPOINT_DIR).exists():
        # Killed before the run described itself: nothing was trained, start afresh.
        return None
    stored = read_json(out / CONFIG_FILE, "training config")
    if not isinstance(stored, dict):
        raise ValueError(f"training config {out / CONFIG_FILE} is not a JSON object")
    if isinstance(stored.get("train"), dict):
        # a run written before a field existed has that field's default; a config that
        # cannot be read is reported as a difference below
        with contextlib.suppress(TypeError, ValueError):
            stored["train"] = TrainConfig.from_json(stored["train"]).to_json()
    for key in ("train", "env", "data", "imaginary"):
        if stored.get(key) != description[key]:
            raise ValueError(
                f"cannot resume {out}: its {key!r} differs from this run's "
                f"({stored.get(key)!r} vs {description[key]!r})"
            )
    state_path = out / CHECKPOINT_DIR / STATE_FILE
    if not state_path.exists():
        return None
    state = read_json(state_path, "checkpoint state")
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"checkpoint state {state_path}: {problem}")
    if state["step"] > description["train"]["steps"]:
        raise ValueError(f"cannot resume {out}: its checkpoint is at step {state['step']}, "
                         f"past the {description['train']['steps']} steps asked for")
    return state


def _state_problem(state: Any) -> str | None:
    """What is wrong with a checkpoint's state.json, or ``None``."""
    if not isinstance(state, dict):
        return "not a JSON object"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"field 'step' must be a non-negative integer, got {step!r}"
    if not isinstance(state.get("seconds", 0.0), (int, float)):
        return f"field 'seconds' must be a number, got {state.get('seconds')!r}"
    if not isinstance(state.get("numpy_rng"), dict):
        return "field 'numpy_rng' is missing or not an object"
    if not isinstance(state.get("torch_rng"), str):
        return "field 'torch_rng' is missing or not a string"
    model = state.get("model", MODEL_FILE)
    if not isinstance(model, str) or "/" in model or "\\" in model or not model.endswith(".pt"):
        return f"field 'model' must name a .pt file in the checkpoint directory, got {model!r}"
    return None


def _checkpoint_model(state: dict) -> str:
    """The weights file a checkpoint state belongs to (older runs: ``model.pt``)."""
    return state.get("model", MODEL_FILE)
