"""Atomic file writes: a reader never sees half a file, and a killed run leaves the
previous version in place (checkpoints, policies and reports are all rewritten)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NoReturn


def make_dirs(directory: str | Path) -> Path:
    """``mkdir -p`` that names the culprit when a file stands where a directory must go
    (``mkdir`` itself reports a bare "File exists" for it)."""
    directory = Path(directory)
    for ancestor in (directory, *directory.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise NotADirectoryError(f"cannot create {directory}: {ancestor} is a file, not a directory")
            break
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def temporary_sibling(path: Path) -> Path:
    """A unique hidden name next to ``path`` that records the writer's pid, so a later
    writer can tell a dead writer's leftover from a live one's work in progress."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def raise_naming(exc: OSError, path: Path) -> NoReturn:
    """Re-raise ``exc``, naming ``path`` when it names no file (a failed ``write()``:
    disk full, file too large), so the one-line error says which output failed."""
    if exc.filename is None:
        raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    raise exc


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries of ``path`` left by writers that were killed (their pid
    is gone); they were never renamed into place, so nothing read them."""
    prefix = f".{path.name}."
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return
    for candidate in candidates:
        parts = candidate.name[len(prefix):].split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            candidate.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories can't be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write what ``write`` produces to a temporary file next to ``path``, then rename
    it over ``path``.

    ``write`` fills an in-memory buffer and plain file I/O writes it out: a failed
    write (disk full, file too large) is then an ``OSError`` naming ``path``, where
    ``torch.save`` writing to the file itself reports it as a bare ``RuntimeError``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    make_dirs(path.parent)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise_naming(exc, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left by any failure before it
    _fsync_directory(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file we wrote, naming ``what`` it was meant to be when it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


def write_curve(path: str | Path, rows: list[dict[str, float]]) -> None:
    """A loss curve as CSV: ``step`` plus one column per loss (blank where a row lacks it)."""
    keys = sorted({k for row in rows for k in row if k != "step"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", *keys], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def read_curve(path: str | Path) -> list[dict[str, float]]:
    """The loss curve of a policy directory (``step`` plus one column per loss)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]


def json_safe(value):
    """``value`` with non-finite floats as None, for strict JSON (a diverged loss must
    not lose a run's metrics file)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
