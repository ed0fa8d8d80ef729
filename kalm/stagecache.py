"""Content-addressed stage outputs and a run lock, for resumable pipelines.

A stage's output directory is named by a hash of the stage's name, its resolved config
and the keys of the stages it reads. It is built in a temporary sibling directory and
renamed into place only when complete, with a ``stage.json`` record written last
inside it; a directory without that record (left by a kill) is never trusted and is
rebuilt. Change a config and only the stages downstream of it get new keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORD = "stage.json"


class RunLockedError(RuntimeError):
    """Another process is running a pipeline in the same output directory."""


def stage_key(name: str, config: Mapping[str, Any], inputs: Mapping[str, str] | None = None) -> str:
    """A short, stable hash of everything that determines a stage's output."""
    payload = json.dumps({"stage": name, "config": config, "inputs": dict(inputs or {})}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def directory_digest(directory: str | os.PathLike) -> str:
    """A hash of every file's relative path and bytes under ``directory``: the key of
    an input that comes from outside the pipeline (a model grounded elsewhere)."""
    root = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
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
    ) -> StageOutput:
        """Return the stage's completed output directory, building it if needed.

        ``build(tmp_dir)`` writes the outputs into ``tmp_dir`` and may return a small
        JSON-able summary, stored in the stage record. Builders that checkpoint (long
        training) should keep their checkpoints in ``tmp_dir``: it is reused after a
        kill, so a rerun resumes instead of restarting.
        """
        key = stage_key(name, config, inputs)
        final = self.path(name, key)
        if (final / RECORD).is_file():
            record = json.loads((final / RECORD).read_text())
            return StageOutput(name, key, final, True, float(record.get("seconds", 0.0)))
        if final.exists():  # renamed into place but its record is missing: never trust it
            shutil.rmtree(final)
        work = self.root / f".{name}-{key}.partial"
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        summary = build(work) or {}
        seconds = time.perf_counter() - start
        record = {"stage": name, "key": key, "config": config, "inputs": dict(inputs or {}), "seconds": seconds,
                  "summary": summary}
        tmp_record = work / (RECORD + ".tmp")
        tmp_record.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        os.replace(tmp_record, work / RECORD)
        os.replace(work, final)
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
