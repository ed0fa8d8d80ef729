"""The names that identify an episode file, and the error raised for anything malformed.

They sit in a module of their own because both sides of the format need them: the
writer and the in-memory episodes (:mod:`kalm.data.episodes`) and the validating
reader (:mod:`kalm.data.episode_reader`), which :mod:`kalm.data.episodes` imports.
Here, imports run one way. The layout itself is described in :mod:`kalm.data.episodes`.
"""

from __future__ import annotations

FORMAT_NAME = "kalm-episodes"
FORMAT_VERSION = 1
PER_EPISODE_ARRAYS = ("episode_lengths", "terminated", "truncated", "instructions", "tasks")
REQUIRED_ARRAYS = ("observations", "actions", "rewards", *PER_EPISODE_ARRAYS)


class DatasetError(ValueError):
    """An episode file or episode is malformed; the message names the file and the
    field, array or episode at fault."""
