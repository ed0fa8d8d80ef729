"""Offline RL from episode files: instruction encoder, d3rlpy training, policy loading.

``kalm.offline`` depends on ``kalm.envs`` and ``kalm.data`` only; it never imports
grounding or imagination code (imaginary episodes arrive as ordinary episode files).
"""

import contextlib
import io

# d3rlpy imports the unmaintained `gym` package, whose import prints a four-line
# deprecation notice to stderr in every `kalm` command; kalm uses Gymnasium only, so
# the notice is silenced here, once, before any module of this package imports d3rlpy.
with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(ImportError):
    import gym  # noqa: F401
