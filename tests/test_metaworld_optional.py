"""Meta-World is an optional extra: without it CLEVR works and asking for Meta-World says
what to install. Runs whether or not metaworld is installed (a subprocess hides it)."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
sys.modules["metaworld"] = None  # as if the package were not installed
from kalm.envs import available, get_spec
assert "metaworld" in available()
assert get_spec("clevr").name == "clevr"
try:
    get_spec("metaworld")
except ImportError as exc:
    assert "kalm[metaworld]" in str(exc), str(exc)
    print("REFUSED:", exc)
else:
    raise SystemExit("get_spec('metaworld') should have failed")
"""


def test_missing_metaworld_is_named_and_clevr_still_works():
    result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED:" in result.stdout
