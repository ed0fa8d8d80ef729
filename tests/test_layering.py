"""Imports run one way, downward (the architecture's rule): each folder of the package
imports only the folders below it, so a folder can change without surprising those above."""

from __future__ import annotations

import ast
from pathlib import Path

import kalm

ROOT = Path(kalm.__file__).resolve().parent
LEAVES = {"files", "threads", "parallel"}
ALLOWED = {
    "envs": set(),
    "data": {"envs"},
    "grounding": {"envs", "data"},
    "offline": {"envs", "data"},  # a policy needs no LLM: never grounding or imagine
    "imagine": {"envs", "data", "grounding", "offline"},  # offline: the no-LLM ablation's policy
    "evaluation": {"envs", "data", "offline"},
    "report": {"evaluation"},  # reads run directories: no model or env code
    "pipeline": {"kalm", "envs", "data", "grounding", "imagine", "offline", "evaluation", "report"},
    "cli": {"envs", "data", "grounding", "imagine", "offline", "evaluation", "report", "pipeline"},
}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kalm"


def test_every_folder_imports_only_the_folders_below_it():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative == Path("__init__.py") or relative.parts[0] in LEAVES | {"__pycache__"}:
            continue
        source = relative.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                target = _folder(name) if name.startswith("kalm") else None
                if target and target != source and target not in LEAVES and target not in ALLOWED[source]:
                    wrong.append(f"{relative}:{node.lineno} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_leaves_import_nothing_of_kalm():
    for leaf in LEAVES:
        text = (ROOT / f"{leaf}.py").read_text(encoding="utf-8")
        assert "from kalm" not in text and "import kalm" not in text
