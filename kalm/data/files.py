"""Atomic file writes: a reader never sees half a file, and a killed run leaves the
previous version in place (checkpoints, policies and reports are all rewritten)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from kalm.data.episodes import make_dirs, raise_naming, remove_stale_temporaries, temporary_sibling


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
