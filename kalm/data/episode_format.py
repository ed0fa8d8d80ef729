"""The names that identify an episode file, and the error raised for anything malformed.

Both sides of the format need them: :mod:`kalm.data.episodes` (the episodes in memory
and the writer) and the validating reader :mod:`kalm.data.episode_reader`. The first
imports the second, so they live here and the reader never imports back. The layout
itself is described in :mod:`kalm.data.episodes`.
"""

from __future__ import annotations

FORMAT_NAME = "kalm-episodes"
FORMAT_VERSION = 1
PER_EPISODE_ARRAYS = ("episode_lengths", "terminated", "truncated", "instructions", "tasks")
REQUIRED_ARRAYS = ("observations", "actions", "rewards", *PER_EPISODE_ARRAYS)


class DatasetError(ValueError):
    """An episode file or episode is malformed; the message names the file and the
    field, array or episode at fault."""
