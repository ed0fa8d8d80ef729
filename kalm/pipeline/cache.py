"""Content-addressed stage outputs and a run lock, for resumable pipelines.

A stage's output directory is named by a hash of the stage's name, its resolved config,
the keys of the stages it reads, and the code that computes it (kalm's version and the
source of the stage's modules with every kalm module they import). It is built in a
temporary sibling directory and renamed into place only when complete, with a
``stage.json`` record written last inside it; a directory without that record (left by
a kill) is never trusted and is rebuilt. Change a config, or the code of a stage, and
only that stage and those downstream of it get new keys.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kalm
from kalm.parallel import alone, process_group, wait_for_everyone

RECORD = "stage.json"
KALM_ROOT = Path(kalm.__file__).resolve().parent


class RunLockedError(RuntimeError):
    """Another process is running a pipeline in the same output directory."""


def stage_key(name: str, config: Mapping[str, Any], inputs: Mapping[str, str] | None = None, code: str = "") -> str:
    """A short, stable hash of everything that determines a stage's output."""
    payload = json.dumps({"stage": name, "config": config, "inputs": dict(inputs or {}), "code": code},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _module_file(module: str, package: str, root: Path) -> Path | None:
    """The source file of ``module`` inside ``package`` (rooted at ``root``), or None."""
    if module != package and not module.startswith(package + "."):
        return None
    parts = module.split(".")[1:]
    candidate = root.joinpath(*parts)
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every ``package`` module that ``path`` imports, at the top or inside functions;
    ``from pkg.a import b`` names both ``pkg.a`` and ``pkg.a.b`` (b may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == package or n.startswith(package + ".")}


def code_digest(modules: Iterable[str], package: str = "kalm", root: Path | None = None) -> str:
    """A hash of the source of ``modules``, of every ``package`` module they import
    (transitively, read from their syntax trees without importing anything), and of
    the ``__init__`` of every package on the way (importing a module runs them).

    Why the source and not only the version: between releases a changed stage would
    otherwise reuse a stale cached result under the same key."""
    root = root or KALM_ROOT
    pending, files = list(modules), {}
    while pending:
        module = pending.pop()
        path = _module_file(module, package, root)
        if path is None or path in files:
            continue
        files[path] = path.read_bytes()
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        pending.extend(parents)
        pending.extend(_imported_modules(path, package))
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + files[path] + b"\0")
    return digest.hexdigest()[:16]


def directory_digest(directory: str | os.PathLike) -> str:
    """A hash of every file's relative path and bytes under ``directory``: the key of
    an input that comes from outside the pipeline (a model grounded elsewhere)."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda handle=handle: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StageOutput:
    name: str
    key: str
    path: Path
    cached: bool
    seconds: float


class StageCache:
    """Runs stages into ``root/<name>-<key>/`` unless a completed copy exists."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    def is_complete(self, name: str, key: str) -> bool:
        return (self.path(name, key) / RECORD).is_file()

    def run(
        self,
        name: str,
        config: Mapping[str, Any],
        build: Callable[[Path], Mapping[str, Any] | None],
        inputs: Mapping[str, str] | None = None,
        code: Iterable[str] = (),
        scope: str = "main",
    ) -> StageOutput:
        """Return the stage's completed output directory, building it if needed.

        ``build(tmp_dir)`` writes the outputs into ``tmp_dir`` and may return a small
        JSON-able summary, stored in the stage record. ``code`` names the modules that
        compute the stage (their source and kalm's version are part of the key).
        Builders that checkpoint (long training) should keep their checkpoints in
        ``tmp_dir``: it is reused after a kill, so a rerun resumes instead of restarting.

        Under ``accelerate launch`` with several processes (:mod:`kalm.parallel`) every
        process calls this in the same order. ``scope`` says who builds: ``"main"``
        (the first process; the others wait), ``"collective"`` (every process, for
        builders that shard their work and write from the first process only), or
        ``"local"`` (only the calling process, which alone asks for this stage). The
        first process writes the record.
        """
        if scope not in ("main", "collective", "local"):
            raise ValueError(f"scope must be main, collective or local, got {scope!r}")
        index, count = (0, 1) if scope == "local" else process_group()
        sync = wait_for_everyone if count > 1 else (lambda: None)
        version = f"kalm {kalm.__version__}; {code_digest(code)}" if code else ""
        key = stage_key(name, config, inputs, version)
        final = self.path(name, key)
        sync()  # every process sees the cache as it is now
        if (final / RECORD).is_file():
            record = json.loads((final / RECORD).read_text())
            return StageOutput(name, key, final, True, float(record.get("seconds", 0.0)))
        work = self.root / f".{name}-{key}.partial"
        if index == 0:
            if final.exists():  # renamed into place but its record is missing: never trust it
                shutil.rmtree(final)
            work.mkdir(parents=True, exist_ok=True)
        sync()
        start = time.perf_counter()
        if scope == "collective":
            summary = build(work) or {}
        else:
            with alone():
                summary = (build(work) or {}) if index == 0 else {}
        seconds = time.perf_counter() - start
        if index > 0:
            sync()  # until the first process has put the stage in place
            return StageOutput(name, key, final, False, seconds)
        record = {"stage": name, "key": key, "config": config, "inputs": dict(inputs or {}), "code": version,
                  "seconds": seconds, "summary": summary}
        tmp_record = work / (RECORD + ".tmp")
        tmp_record.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(tmp_record, work / RECORD)
        os.replace(work, final)
        sync()
        return StageOutput(name, key, final, False, seconds)


class RunLock:
    """An exclusive lock on a run directory (``flock``: released if the holder dies)."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".kalm-run.lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text().strip() or "another process"
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
