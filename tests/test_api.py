"""The public API: ``import kalm`` registers the environments, every exported name
resolves, and the README's Python example runs (on a tiny model and tiny sizes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_import_kalm_registers_the_gymnasium_ids():
    code = ("import gymnasium as gym, kalm; env = gym.make('kalm/CLEVRRobot-v0'); obs, _ = env.reset(seed=0); "
            "print(obs.shape, 'kalm/MetaWorld-v0' in gym.registry)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["(10,)", "True"]


def test_every_public_name_resolves_and_import_kalm_stays_light():
    # after every subpackage is imported too: a public name that a subpackage shares
    # would then be the module, not the function
    code = ("import sys, types, kalm; print('torch' in sys.modules); "
            "import kalm.data, kalm.grounding, kalm.imagine, kalm.offline, kalm.evaluation, kalm.pipeline, kalm.report; "
            "print([n for n in kalm.__all__[1:] if isinstance(getattr(kalm, n), types.ModuleType)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "[]"]


def test_the_readme_python_example_runs(tiny_backbone, tmp_path, monkeypatch):
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    # the example as a user runs it, made small: a tiny model and a few of everything
    smaller = {
        '"smollm2"': repr(str(tiny_backbone)),
        "CollectConfig(episodes=200,": "CollectConfig(episodes=20,",
        "GroundingConfig(steps=100)": "GroundingConfig(steps=4, eval_episodes=2, precision='fp32')",
        'ImagineConfig(level="easy", n=240)': 'ImagineConfig(level="easy", n=8, keep_failures=True, physics_filter=False)',
        "TrainConfig(steps=2000)": "TrainConfig(steps=20)",
        "episodes=50)": "episodes=4)",
    }
    for old, new in smaller.items():
        assert old in block, f"the README example no longer contains {old!r}: update this test"
        block = block.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    results = namespace["results"]
    assert results["levels"]["easy"]["episodes"] == 4 and 0.0 <= results["levels"]["easy"]["success_rate"] <= 1.0
    assert (tmp_path / "runs" / "bc" / "model.pt").is_file() and (tmp_path / "data" / "easy.h5").is_file()
