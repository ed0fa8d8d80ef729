"""A grounded model on disk, and the checkpoints of a grounding run.

A model directory holds ``grounding_config.json`` (the :class:`GroundedLMConfig`),
``io_layers.safetensors`` (the new layers and the dataset statistics), ``tokenizer/``
and either ``adapter/`` (LoRA, applied to the base model the config names) or ``llm/``
(full weights). A training checkpoint (``checkpoints/step-NNNNNNN/``) adds the
optimizer (``torch.load(weights_only=True)``), the torch RNG (safetensors) and the
trainer's state (JSON). No pickle anywhere; every directory is written under a
temporary name and renamed into place, so a reader sees a whole checkpoint or none.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch

from kalm.files import raise_naming, write_atomic, write_json_atomic
from kalm.grounding.backbone import keep_first_layers, load_backbone, resize_embeddings
from kalm.grounding.model import GroundedLM, GroundedLMConfig, IOLayers, LoraSettings, NormStats

CONFIG_FILE = "grounding_config.json"
IO_FILE = "io_layers.safetensors"
# 2: the LoRA settings are one object ("lora"); format 1 (flat lora_* fields) still loads.
FORMAT_VERSION = 2
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_STATS = ("state_mean", "state_std", "delta_std", "action_mean", "action_std")


class GroundingCheckpointError(ValueError):
    """A grounding checkpoint is missing, malformed or belongs to another environment."""


def config_to_json(config: GroundedLMConfig) -> dict:
    data = asdict(config)
    data["lora"]["targets"] = list(config.lora.targets)
    return {"format": FORMAT_VERSION, **data}


def config_from_json(data: dict, where: str) -> GroundedLMConfig:
    """The model config stored in a checkpoint, refusing missing or unknown fields."""
    if not isinstance(data, dict):
        raise GroundingCheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("format", None)
    if version == 1:
        flat = {k: data.pop(f"lora_{k}") for k in ("rank", "alpha", "dropout", "targets") if f"lora_{k}" in data}
        data["lora"] = flat
    elif version != FORMAT_VERSION:
        raise GroundingCheckpointError(f"{where}: unsupported checkpoint format")
    known = {f.name for f in fields(GroundedLMConfig)}
    missing = [f.name for f in fields(GroundedLMConfig) if f.name not in data and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise GroundingCheckpointError(f"{where}: missing config field {missing[0]!r}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise GroundingCheckpointError(f"{where}: unknown config field {unknown[0]!r}")
    try:
        if "lora" in data:
            lora = dict(data["lora"])
            if "targets" in lora:
                lora["targets"] = tuple(lora["targets"])
            data["lora"] = LoraSettings(**lora)
        return GroundedLMConfig(**data)
    except (TypeError, ValueError) as exc:
        raise GroundingCheckpointError(f"{where}: malformed config ({exc})") from exc


def check_compatible(config: GroundedLMConfig, spec, where) -> None:
    """Refuse a checkpoint whose state/action shapes differ from the env's."""
    ours = (config.state_dim, config.action_dim, config.discrete)
    theirs = (spec.state_dim, spec.action_dim, spec.discrete)
    if ours != theirs:
        def describe(s, a, d):
            return f"state_dim {s}, {a} {'discrete actions' if d else '-dim continuous actions'}"

        raise GroundingCheckpointError(
            f"the grounding checkpoint {where} was trained for env {config.env!r} ({describe(*ours)}); "
            f"env {spec.name!r} has {describe(*theirs)}")


def check_grounded_model_dir(directory: str | os.PathLike, spec) -> None:
    """A model grounded elsewhere must be a grounding checkpoint for this env's shapes:
    read from its config alone, so a wrong path fails before any work starts."""
    path = Path(directory)
    if not (path / CONFIG_FILE).is_file():
        raise GroundingCheckpointError(f"{path} is not a grounded model directory (no {CONFIG_FILE}; pass the "
                                       "model/ folder written by `kalm ground`)")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise GroundingCheckpointError(f"{path / CONFIG_FILE}: not valid JSON ({exc})") from None
    check_compatible(config_from_json(meta, str(path / CONFIG_FILE)), spec, path)


def save_grounded(model: GroundedLM, directory: str | os.PathLike) -> Path:
    """Write the checkpoint atomically (a temp directory renamed into place)."""
    from safetensors.torch import save

    if model.merged:
        raise ValueError("this model's LoRA weights were merged for inference (merge_lora); "
                         "save the model before merging")
    if model.inference_dtype != torch.float32:
        raise ValueError("this model was cast to bf16 for inference (use_inference_precision); "
                         "save the model before casting")
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(config_to_json(model.config), indent=2))
        # serialised in memory, written with plain file I/O: a full disk is an OSError
        (staging / IO_FILE).write_bytes(
            save({k: v.detach().contiguous().cpu() for k, v in model.io.state_dict().items()}))
        model.tokenizer.save_pretrained(staging / "tokenizer")
        if model.config.finetune == "lora":
            model.llm.save_pretrained(staging / "adapter", save_embedding_layers=False)
        else:
            model.llm.save_pretrained(staging / "llm")
        staging.chmod(0o755)
        _swap_into_place(staging, out)
    except OSError as exc:
        raise_naming(exc, out)
    except Exception as exc:
        # safetensors (peft's adapter) and the Rust tokenizers report a failed write
        # (disk full) with their own exception types
        raise OSError(f"cannot write {out}: {type(exc).__name__}: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def load_grounded(directory: str | os.PathLike, spec=None, trainable: bool = False,
                  backbone: str | None = None) -> GroundedLM:
    """Restore a checkpoint; with ``spec`` given, refuse one made for other shapes.

    ``backbone`` overrides the base model a LoRA checkpoint is applied to (when the
    original path moved).
    """
    path = Path(directory)
    try:
        return _load(path, spec, trainable, backbone)
    except (GroundingCheckpointError, OSError):
        raise
    except Exception as exc:
        raise GroundingCheckpointError(f"{path}: damaged grounding checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_config(path: Path) -> GroundedLMConfig:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise GroundingCheckpointError(f"not a grounding checkpoint (no {CONFIG_FILE}): {path}")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GroundingCheckpointError(f"{config_path}: not valid JSON ({exc})") from exc
    return config_from_json(meta, str(config_path))


def _load_llm(path: Path, config: GroundedLMConfig, tokenizer, trainable: bool, backbone: str | None):
    from transformers import AutoModelForCausalLM

    if config.finetune == "full":
        return AutoModelForCausalLM.from_pretrained(str(path / "llm"), dtype=torch.float32)
    from peft import PeftModel

    llm, _ = load_backbone(backbone or config.backbone)
    if config.base_vocab_size and llm.get_input_embeddings().weight.shape[0] != config.base_vocab_size:
        raise GroundingCheckpointError(
            f"{path}: the base model {backbone or config.backbone} has a different vocabulary than the one "
            "this adapter was trained on")
    keep_first_layers(llm, config.layers)
    resize_embeddings(llm, len(tokenizer))
    return PeftModel.from_pretrained(llm, str(path / "adapter"), is_trainable=trainable)


def _load_io(path: Path, config: GroundedLMConfig, hidden_size: int) -> IOLayers:
    from safetensors.torch import load_file

    io_path = path / IO_FILE
    if not io_path.is_file():
        raise GroundingCheckpointError(f"{io_path}: missing (the checkpoint has no trajectory I/O layers)")
    try:
        io_state = load_file(str(io_path))
    except Exception as exc:
        raise GroundingCheckpointError(f"{io_path}: not a readable safetensors file ({exc})") from exc
    missing = [k for k in _STATS if k not in io_state]
    if missing:
        raise GroundingCheckpointError(f"{io_path}: missing tensor {missing[0]!r}")
    stats = NormStats(**{k: io_state[k].numpy() for k in _STATS})
    io = IOLayers(config, hidden_size, 1.0, stats)
    try:
        io.load_state_dict(io_state, strict=True)
    except RuntimeError as exc:
        raise GroundingCheckpointError(f"{io_path}: does not match the config ({exc})") from exc
    return io


def _load(path: Path, spec, trainable: bool, backbone: str | None) -> GroundedLM:
    from transformers import AutoTokenizer

    config = _read_config(path)
    if spec is not None:
        check_compatible(config, spec, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    llm = _load_llm(path, config, tokenizer, trainable, backbone)
    model = GroundedLM(llm, tokenizer, config, _load_io(path, config, llm.config.hidden_size))
    if not trainable:
        model.eval()
    return model


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and
    deleted only after the new one is in place."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


# ---------------------------------------------------------------- training checkpoints
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete training checkpoint under ``out`` (its state written last)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_STATE).is_file())
    return done[-1] if done else None


def save_training_checkpoint(out: Path, step: int, model: GroundedLM, optimizer, scheduler, state: dict,
                             keep: int) -> Path:
    """Write ``checkpoints/step-<step>/`` (model, optimizer, RNG, then ``state``) and
    keep only the newest ``keep`` checkpoints."""
    from safetensors.torch import save

    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}-", dir=root))
    try:
        save_grounded(model, staging / "model")
        # serialised in memory and written with plain file I/O, so a full disk is an
        # OSError naming the file (torch.save and safetensors raise their own types)
        write_atomic(staging / "optimizer.pt", lambda f: torch.save(optimizer.state_dict(), f))
        write_atomic(staging / "rng.safetensors", lambda f: f.write(save({"torch_rng": torch.get_rng_state()})))
        write_json_atomic(staging / TRAINER_STATE, {"step": step, "scheduler": scheduler.state_dict(), **state})
        staging.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_training_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def restore_training_checkpoint(path: Path, optimizer, scheduler, state: dict) -> None:
    """Load the optimizer, scheduler and torch RNG saved in checkpoint ``path``."""
    from safetensors.torch import load_file

    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_rng"])
