"""Bad input through the real ``kalm`` command: every refusal is one line naming the
file and what is wrong in it, the exit status is 2, no traceback, no output left behind.

Also: a second ``kalm run`` on a busy directory, unwritable outputs, and a scan of the
package source for loaders that could run code from a file.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from kalm.cli import app
from kalm.data.episodes import Episode, EpisodeDataset, save_episodes
from kalm.envs import get_spec
from kalm.pipeline.cache import RunLock

SPEC = get_spec("clevr")
TASK = {"kind": "relation", "object": "red", "anchor": "blue", "direction": "left"}
RUNNER = CliRunner()
PACKAGE = Path(__file__).resolve().parents[1] / "kalm"


def kalm(*args) -> tuple[int, str, str]:
    """Run ``kalm args`` in process; (exit code, stdout, stderr)."""
    result = RUNNER.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"kalm {' '.join(map(str, args))} raised {result.exception!r}") from result.exception
    return result.exit_code, result.stdout, result.stderr


def refused(*args, names: str | Path, says: str | tuple[str, ...]) -> str:
    """Assert the command is refused with one ``error:`` line naming ``names`` and
    containing ``says`` (any of them, when a tuple); return that line."""
    code, out, err = kalm(*args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, out, err)
    assert len(errors) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    line = errors[0]
    assert str(names) in line, line
    says = (says,) if isinstance(says, str) else says
    assert any(s in line for s in says), line
    return line


# ----------------------------------------------------------------------------- fixtures
def _dataset(n: int = 6, seed: int = 0) -> EpisodeDataset:
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n):
        length = int(rng.integers(1, 6))
        episodes.append(Episode(
            observations=rng.uniform(-0.4, 0.45, size=(length + 1, SPEC.state_dim)),
            actions=rng.integers(0, SPEC.action_dim, size=length),
            rewards=np.zeros(length),
            terminated=bool(i % 2),
            truncated=not i % 2,
            instruction="Push the red ball to the left of the blue ball",
            task=TASK,
        ))
    return EpisodeDataset("clevr", tuple(episodes), {"source": "test"})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def good_data(workdir) -> Path:
    return save_episodes(_dataset(), workdir / "good.h5")


@pytest.fixture(scope="module")
def policy(workdir, good_data) -> Path:
    out = workdir / "policy"
    code, _, err = kalm("train", "--data", good_data, "--out", out, "--steps", 4, "--checkpoint-every", 2,
                        "--encoder", "minilm")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def unfinished_policy(workdir, good_data) -> Path:
    """A run stopped at its checkpoint at step 2 of 4 (as a kill would leave it)."""
    from kalm.offline.config import TrainConfig
    from kalm.offline.train import train

    out = workdir / "unfinished"
    train(good_data, out, TrainConfig(steps=4, checkpoint_every=2, encoder="minilm"), progress=False, stop_after=2)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- task files
def _line(task) -> str:
    return json.dumps({"instruction": "do it", "task": task})


GOOD_LINE = _line(TASK)
TASK_LINES = {
    "unknown kind": (_line({"kind": "fly"}), "unknown kind 'fly'"),
    "unknown colour": (_line({**TASK, "object": "pink"}), "unknown colour 'pink'"),
    "unknown direction": (_line({**TASK, "direction": "up"}), "unknown direction 'up'"),
    "missing field": (_line({k: v for k, v in TASK.items() if k != "anchor"}), "missing field 'anchor'"),
    "mistyped field": (_line({**TASK, "object": 3}), "expected a string, got int"),
    "same ball": (_line({**TASK, "anchor": "red"}), "the object and the anchor are the same ball"),
    "empty all_of": (_line({"kind": "all_of", "tasks": []}), "needs at least one task"),
    "absurd nesting": ("[" * 50000 + "]" * 50000, "nested 50000 levels"),
    "deep all_of": (_line(json.loads('{"kind": "all_of", "tasks": [' * 40 + '{"kind": "line"}' + "]}" * 40)),
                    "nested"),
    "NaN": ('{"instruction": "x", "task": {"kind": "circle", "center": NaN}}', "NaN is not valid JSON"),
    "Infinity": ('{"instruction": "x", "task": -Infinity}', "Infinity is not valid JSON"),
    "missing instruction": (json.dumps({"task": TASK}), "missing field 'instruction'"),
    "instruction not text": (json.dumps({"instruction": 7, "task": TASK}), "non-empty string"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "truncated JSON": (GOOD_LINE[:-5], "invalid JSON"),
}


@pytest.mark.parametrize("bad, message", list(TASK_LINES.values()), ids=list(TASK_LINES))
def test_a_bad_task_line_among_good_ones_is_refused_by_its_number(tmp_path, bad, message):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join([GOOD_LINE, "", GOOD_LINE, bad, GOOD_LINE]) + "\n")
    out = tmp_path / "eval.json"
    refused("evaluate", "--baseline", "random", "--env", "clevr", "--tasks", path, "--episodes", 1, "--out", out,
            names=f"{path}:4:", says=message)
    assert not out.exists() and not out.with_suffix(".md").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "holds no tasks"),
    (b"\n \n\t\n", "holds no tasks"),
    (b'{"instruction": "caf\xe9", "task": {"kind": "line"}}\n', ":1: not UTF-8"),
    (bytes(range(128, 256)) * 4, ":1: not UTF-8"),
    (b"\x00\x01\x02binary\x00", ":1:"),
], ids=["empty", "blank", "latin-1", "binary", "nul bytes"])
def test_unreadable_task_files_are_refused(tmp_path, content, message):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes(content)
    refused("evaluate", "--baseline", "random", "--env", "clevr", "--tasks", path, "--episodes", 1,
            "--out", tmp_path / "e.json", names=path, says=message)
    assert not (tmp_path / "e.json").exists()


def test_a_missing_task_file_is_refused(tmp_path):
    refused("evaluate", "--baseline", "random", "--env", "clevr", "--tasks", tmp_path / "none.jsonl",
            names=tmp_path / "none.jsonl", says="no such task file")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=60).filter(lambda b: b"\n" not in b and b.strip()),
       before=st.integers(0, 3))
def test_any_garbage_line_fails_the_command_in_one_line(tmp_path_factory, garbage, before):
    path = tmp_path_factory.mktemp("tf") / "t.jsonl"
    path.write_bytes(b"\n".join([GOOD_LINE.encode()] * before + [garbage, GOOD_LINE.encode()]))
    refused("evaluate", "--baseline", "random", "--env", "clevr", "--tasks", path, "--episodes", 1,
            "--out", path.with_suffix(".json"), names=f"{path}:{before + 1}:", says=":")


# ----------------------------------------------------------------------------- datasets
def _rewrite(path: Path, name: str, data=None, dtype=None, rename: str | None = None) -> None:
    with h5py.File(path, "r+") as f:
        if rename is not None:
            f.move(name, rename)
            return
        del f[name]
        if data is not None:
            f.create_dataset(name, data=data, dtype=dtype)


def _damage(kind: str, path: Path, good: Path) -> None:
    raw = good.read_bytes()
    rng = np.random.default_rng(0)
    with h5py.File(good) as f:
        n_obs, n_act, n_eps = len(f["observations"]), len(f["actions"]), len(f["episode_lengths"])
        lengths = f["episode_lengths"][()]
    if kind == "empty":
        path.write_bytes(b"")
        return
    if kind == "random bytes":
        path.write_bytes(rng.bytes(4096))
        return
    if kind == "text":
        path.write_text("observations,actions\n0.1,3\n")
        return
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
        return
    if kind == "truncated header":
        path.write_bytes(raw[:600])
        return
    path.write_bytes(raw)
    edits = {
        "missing array": lambda: _rewrite(path, "rewards"),
        "misnamed array": lambda: _rewrite(path, "actions", rename="action"),
        "wrong shape": lambda: _rewrite(path, "observations", np.zeros((n_obs, SPEC.state_dim + 2), np.float32)),
        "wrong dtype": lambda: _rewrite(path, "actions", np.zeros(n_act, np.float32)),
        "string observations": lambda: _rewrite(path, "observations", ["x"] * n_obs, h5py.string_dtype()),
        "NaN": lambda: _rewrite(path, "observations", np.full((n_obs, SPEC.state_dim), np.nan, np.float32)),
        "inf": lambda: _rewrite(path, "rewards", np.full(n_act, np.inf, np.float32)),
        "action outside the space": lambda: _rewrite(path, "actions", np.full(n_act, SPEC.action_dim, np.int64)),
        "negative action": lambda: _rewrite(path, "actions", np.full(n_act, -1, np.int64)),
        "inconsistent lengths": lambda: _rewrite(path, "episode_lengths", lengths + 1),
        "zero-length episode": lambda: _rewrite(path, "episode_lengths", np.r_[0, lengths[1:]]),
        "flags for other episodes": lambda: _rewrite(path, "terminated", np.zeros(n_eps + 1, bool)),
        "bad task": lambda: _rewrite(path, "tasks", [json.dumps({**TASK, "anchor": "red"})] * n_eps,
                                     h5py.string_dtype()),
    }
    edits[kind]()


DATASET_CASES = {
    "empty": "the file is empty",
    "random bytes": "not an HDF5 file",
    "text": "not an HDF5 file",
    "truncated": ("unreadable HDF5", "cannot be read", "damaged"),
    "truncated header": ("unreadable HDF5", "cannot be read", "damaged"),
    "missing array": "missing array 'rewards'",
    "misnamed array": "missing array 'actions' (found unexpected: 'action')",
    "wrong shape": "array 'observations' has state_dim 12",
    "wrong dtype": "array 'actions' has dtype float32",
    "string observations": "array 'observations' has dtype",
    "NaN": "array 'observations' contains NaN or inf",
    "inf": "array 'rewards' contains NaN or inf",
    "action outside the space": "outside Discrete(40)",
    "negative action": "outside Discrete(40)",
    "inconsistent lengths": "'episode_lengths' implies",
    "zero-length episode": "episode 0 has length 0",
    "flags for other episodes": "array 'terminated' has",
    "bad task": "array 'tasks', episode 0",
}


@pytest.mark.parametrize("kind, message", list(DATASET_CASES.items()), ids=list(DATASET_CASES))
def test_bad_datasets_fail_inspect_and_train_in_one_line(tmp_path, good_data, kind, message):
    path = tmp_path / "data.h5"
    _damage(kind, path, good_data)
    refused("data", "inspect", path, names=path, says=message)
    out = tmp_path / "policy"
    refused("train", "--data", good_data, "--imaginary", path, "--out", out, "--steps", 1, names=path, says=message)
    assert not out.exists()


def test_a_missing_dataset_and_a_directory_are_refused(tmp_path):
    refused("data", "inspect", tmp_path / "none.h5", names=tmp_path / "none.h5", says="no such file")
    refused("train", "--data", tmp_path, "--out", tmp_path / "p", names=tmp_path, says="is a directory")
    assert not (tmp_path / "p").exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_damaged_bytes_never_escape_as_a_traceback(tmp_path_factory, good_data, cut, flips):
    raw = bytearray(good_data.read_bytes())
    for where, value in flips:
        raw[int(where * (len(raw) - 1))] = value
    raw = raw[: max(1, int(cut * len(raw)))] if cut < 1 else raw
    path = tmp_path_factory.mktemp("dmg") / "d.h5"
    path.write_bytes(bytes(raw))
    code, _out, err = kalm("data", "inspect", path)
    assert "Traceback" not in err
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and str(path) in errors[0], err


# ----------------------------------------------------------------------------- policies
def _evaluate(policy_dir: Path, tmp_path: Path, **kw) -> tuple:
    return ("evaluate", "--policy", policy_dir, "--level", "seen", "--episodes", 1, "--out", tmp_path / "e.json")


def test_a_valid_policy_evaluates(policy, tmp_path):
    code, _out, err = kalm(*_evaluate(policy, tmp_path))
    assert code == 0, err
    assert (tmp_path / "e.json").exists()


def test_a_missing_policy_is_refused(tmp_path):
    refused(*_evaluate(tmp_path / "none", tmp_path), names=tmp_path / "none", says="not found")


def test_a_truncated_model_is_refused(policy, tmp_path):
    p = _copy(policy, tmp_path)
    raw = (p / "model.pt").read_bytes()
    (p / "model.pt").write_bytes(raw[: len(raw) // 2])
    refused(*_evaluate(p, tmp_path), names=p / "model.pt", says="not a weights-only model file")
    assert not (tmp_path / "e.json").exists()


def test_an_empty_model_file_is_refused(policy, tmp_path):
    p = _copy(policy, tmp_path)
    (p / "model.pt").write_bytes(b"")
    refused(*_evaluate(p, tmp_path), names=p / "model.pt", says="not a weights-only model file")


def test_weights_of_another_environment_are_refused(policy, tmp_path):
    """Networks shaped for another state size, with a config that agrees with them."""
    p = _copy(policy, tmp_path)
    states = torch.load(p / "model.pt", weights_only=True)
    for module in states.values():
        for name, tensor in list(module.items()):
            if isinstance(tensor, torch.Tensor) and tensor.ndim == 2 and tensor.shape[1] > 300:
                module[name] = torch.zeros(tensor.shape[0], tensor.shape[1] + 29)
    torch.save(states, p / "model.pt")
    refused(*_evaluate(p, tmp_path), names=p / "model.pt", says="does not fit the network")


def test_a_network_config_for_another_environment_is_refused(policy, tmp_path):
    p = _copy(policy, tmp_path)
    algo = json.loads((p / "algo.json").read_text())
    algo["observation_shape"] = [algo["observation_shape"][0] + 29]
    (p / "algo.json").write_text(json.dumps(algo))
    refused(*_evaluate(p, tmp_path), names=p / "algo.json", says="network for observations")


def test_a_policy_config_for_another_state_size_is_refused(policy, tmp_path):
    p = _copy(policy, tmp_path)
    config = json.loads((p / "config.json").read_text())
    config.update(state_dim=39, observation_dim=config["observation_dim"] + 29, action_size=4)
    (p / "config.json").write_text(json.dumps(config))
    refused(*_evaluate(p, tmp_path), names=p / "config.json", says="the policy takes 39-d states")


@pytest.mark.parametrize("edit, says", [
    (lambda c: c.pop("encoder"), "field 'encoder' is missing"),
    (lambda c: c.update(observation_dim="big"), "field 'observation_dim'"),
    (lambda c: c.update(train=[]), "field 'train'"),
    (lambda c: c.update(env="atari"), "unknown environment 'atari'"),
], ids=["missing field", "mistyped field", "train not an object", "unknown env"])
def test_a_damaged_policy_config_is_refused(policy, tmp_path, edit, says):
    p = _copy(policy, tmp_path)
    config = json.loads((p / "config.json").read_text())
    edit(config)
    (p / "config.json").write_text(json.dumps(config))
    line = refused(*_evaluate(p, tmp_path), names="", says=says)
    assert "config.json" in line or "atari" in line


@pytest.mark.parametrize("name, content, says", [
    ("config.json", "{oops", "not valid JSON"),
    ("config.json", "[1]", "expected a JSON object"),
    ("algo.json", "[]", "not a d3rlpy algorithm config"),
    ("algo.json", '{"observation_shape": [-5], "action_size": 40, "config": {"type": "discrete_bc", "params": {}}}',
     "algo.json"),
])
def test_malformed_policy_json_is_refused(policy, tmp_path, name, content, says):
    p = _copy(policy, tmp_path)
    (p / name).write_text(content)
    refused(*_evaluate(p, tmp_path), names=p / name, says=says)


def _resume(data: Path, out: Path) -> tuple:
    return ("train", "--data", data, "--out", out, "--steps", 4, "--checkpoint-every", 2, "--encoder", "minilm",
            "--resume")


def test_resume_from_a_truncated_checkpoint_is_refused(unfinished_policy, good_data, tmp_path):
    p = _copy(unfinished_policy, tmp_path)
    (model,) = (p / "checkpoint").glob("model*.pt")
    model.write_bytes(model.read_bytes()[:100])
    before = sorted(f.name for f in p.rglob("*"))
    refused(*_resume(good_data, p), names=model, says="not a weights-only model file")
    assert sorted(f.name for f in p.rglob("*")) == before


@pytest.mark.parametrize("state, says", [
    ("{", "not valid JSON"),
    ('{"step": "x"}', "field 'step'"),
    ('{"step": 2, "seconds": 0, "numpy_rng": {"bit_generator": "nope"}, "torch_rng": "AAAA", "model": "model.pt"}',
     ("unusable RNG state", "not found")),
    ('{"step": 2, "seconds": 0, "numpy_rng": {}, "torch_rng": "", "model": "../../etc/passwd"}', "field 'model'"),
], ids=["malformed", "mistyped step", "bad rng", "escaping path"])
def test_resume_from_a_damaged_state_file_is_refused(unfinished_policy, good_data, tmp_path, state, says):
    p = _copy(unfinished_policy, tmp_path)
    (p / "checkpoint" / "state.json").write_text(state)
    refused(*_resume(good_data, p), names=p, says=says)


def test_a_resumed_unfinished_policy_completes(unfinished_policy, good_data, tmp_path):
    p = _copy(unfinished_policy, tmp_path)
    refused(*_evaluate(p, tmp_path), names=p, says="unfinished run")
    code, _, err = kalm(*_resume(good_data, p))
    assert code == 0, err
    assert json.loads((p / "config.json").read_text())["completed_steps"] == 4


# ----------------------------------------------------------------------------- models and configs
def _fake_model_dir(path: Path, config) -> Path:
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


@pytest.mark.parametrize("make, says", [
    (lambda d: d / "absent", "language model not found"),
    (lambda d: (d / "file").write_text("x") and d / "file", "is not a directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no config.json"),
    (lambda d: _fake_model_dir(d / "bert", {"model_type": "bert", "architectures": ["BertModel"]}),
     "not a causal language model"),
    (lambda d: _fake_model_dir(d / "vit", {"model_type": "vit"}), "not a causal language model"),
    (lambda d: _fake_model_dir(d / "broken", "{not json"), ("not a readable model config", "cannot read")),
], ids=["missing", "a file", "no config", "encoder", "vision", "malformed config"])
def test_run_refuses_an_llm_that_is_not_a_causal_lm_before_any_work(tmp_path, make, says):
    llm = make(tmp_path)
    out = tmp_path / "run"
    refused("run", "--config", "clevr-tiny", "--llm", llm, "--out", out, names=llm, says=says)
    assert not out.exists()


def test_ground_refuses_an_encoder_as_backbone(tmp_path, good_data):
    """In a fresh process: grounding sets up accelerate's process-wide state, which other
    tests in this process may already have configured."""
    import subprocess
    import sys

    llm = _fake_model_dir(tmp_path / "bert", {"model_type": "bert", "architectures": ["BertModel"]})
    out = tmp_path / "g"
    done = subprocess.run([sys.executable, "-m", "kalm.cli", "ground", "--data", str(good_data), "--llm", str(llm),
                           "--out", str(out), "--steps", "1"], capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and str(llm) in errors[0] and "not a causal language model" in errors[0], errors
    assert not (out / "model").exists()


def test_run_refuses_a_grounded_model_that_is_not_one(tmp_path):
    """``kalm run --grounded-model`` checks the directory before any stage starts."""
    out = tmp_path / "run"
    missing = tmp_path / "no-model"
    refused("run", "--config", "clevr-tiny", "--grounded-model", missing, "--out", out, names=missing,
            says="not a grounded model directory")
    assert not (out / "stages").exists()


def test_ground_takes_a_presets_grounding_settings(tmp_path, good_data, tiny_backbone):
    """``kalm ground --preset clevr-gpu`` grounds with that preset's settings (what
    ``kalm run --config clevr-gpu`` would use); an unknown preset is named."""
    import subprocess
    import sys

    from kalm.pipeline import load_config

    def ground(*args):
        return subprocess.run([sys.executable, "-m", "kalm.cli", "ground", "--data", str(good_data), "--llm",
                               str(tiny_backbone), "--steps", "1", "--checkpoint-every", "0", *args],
                              capture_output=True, text=True, timeout=300)

    done = ground("--preset", "clevr-huge", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "unknown config 'clevr-huge'" in done.stderr, done.stderr
    done = ground("--preset", "clevr-gpu", "--out", str(tmp_path / "g"))
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "g" / "grounding_config.json").read_text())
    preset = load_config("clevr-gpu").grounding
    assert saved["batch_tokens"] == preset.batch_tokens and saved["max_batch_size"] == preset.max_batch_size
    assert saved["steps"] == 1


@pytest.mark.parametrize("content, says", [
    (b"{oops", "not a JSON config"),
    (b"", "not a JSON config"),
    (b"\xff\xfe\x00", "not a JSON config"),
    (b'{"train": {"steps": NaN}}', "NaN is not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"trian": {}}', "unknown field 'trian'"),
    (b'{"train": {"stepz": 1}}', "unknown field 'stepz'"),
    (b'{"train": {"steps": "many"}}', "train.steps: expected int, got str"),
    (b'{"train": {"steps": 0}}', "steps must be a positive integer"),
    (b'{"train": 5}', "expected a JSON object, got int"),
    (b'{"seeds": 3}', "seeds: expected a JSON array"),
    (b'{"seeds": [-1]}', "'seeds'"),
    (b'{"collect": {"episodes": -1}}', "episodes must be >= 1"),
    (b'{"collect": {"epsilon": 2.0}}', "epsilon must be in [0, 1]"),
    (b'{"levels": {"nope": {}}}', "unknown level 'nope'"),
    (b'{"levels": ["easy"]}', "levels: expected a JSON object, got list"),
    (b'{"levels": {"easy": 5}}', "levels.easy: expected a JSON object, got int"),
    (b'{"levels": {"easy": {"n": 0}}}', "levels.easy: n must be a whole number >= 1 or null, got 0"),
    (b'{"levels": {"easy": {"n": 2.5}}}', "levels.easy.n: expected int, got float"),
    (b'{"levels": {"easy": {"count": 5}}}', "levels.easy: unknown field 'count'"),
    (b'{"levels": {"rephrase": {"max_steps": 0}}}', "levels.rephrase: max_steps must be a whole number >= 1"),
    (b'{"levels": {"rephrase": {"starts_per_instruction": 0}}}', "starts_per_instruction must be a whole number"),
    (b'{"levels": {"easy": {"temperature": -1.0}}}', "levels.easy: temperature must be a number >= 0"),
    (b'{"levels": {"easy": {"compose": "yes"}}}', "levels.easy.compose: expected bool, got str"),
    (b'{"env": "nope"}', "unknown environment 'nope'"),
    (b'{"eval_episodes": 0}', "eval_episodes"),
], ids=lambda v: v.decode("latin-1")[:30] if isinstance(v, bytes) else None)
def test_a_bad_run_config_is_refused_before_anything_is_written(tmp_path, content, says):
    config = tmp_path / "config.json"
    config.write_bytes(content)
    out = tmp_path / "run"
    line = refused("run", "--config", config, "--out", out, names="", says=says)
    assert "config" in line
    assert not out.exists()


def test_an_unknown_preset_is_refused(tmp_path):
    refused("run", "--config", "clevr-huge", "--out", tmp_path / "r", names="clevr-huge", says="not a preset")
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- locks and outputs
def test_a_second_run_on_a_busy_directory_is_refused(tmp_path):
    llm = _fake_model_dir(tmp_path / "llm", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    out = tmp_path / "run"
    with RunLock(out):  # as a first `kalm run` holds it
        before = sorted(p.name for p in out.iterdir())
        refused("run", "--config", "clevr-tiny", "--llm", llm, "--out", out, names=out,
                says=f"in use by pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == before


def test_outputs_under_a_file_are_refused_and_the_file_is_kept(tmp_path, good_data):
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"precious")
    refused("collect", "--episodes", 1, "--out", blocker / "x.h5", names=blocker, says="is a file, not a directory")
    refused("train", "--data", good_data, "--out", blocker / "p", "--steps", 1, names=blocker,
            says="is a file, not a directory")
    refused("train", "--data", good_data, "--out", blocker, "--steps", 1, names=blocker, says="is a file")
    refused("evaluate", "--baseline", "random", "--env", "clevr", "--level", "seen", "--episodes", 1,
            "--out", blocker / "e.json", names=blocker, says="is a file, not a directory")
    refused("data", "import-kalm", "--src", tmp_path / "none.npz", "--out", blocker / "x.h5", names="none.npz",
            says="")
    assert blocker.read_bytes() == b"precious"


def test_a_read_only_location_gives_a_clear_error(tmp_path, good_data):
    """Tests run as root, where file modes do not stop writes; /proc refuses new
    entries even to root, so it stands in for a read-only mount."""
    target = Path("/proc/kalm-reliability/x.h5")
    try:
        target.parent.mkdir()
    except OSError:
        pass
    else:
        target.parent.rmdir()
        pytest.skip("/proc accepts new directories here: no read-only location to test with")
    refused("collect", "--episodes", 1, "--out", target, names="/proc/kalm-reliability",
            says=("No such file", "Permission denied", "Read-only", "Operation not permitted"))
    refused("train", "--data", good_data, "--out", target.parent / "p", "--steps", 1, names="/proc/kalm-reliability",
            says=("No such file", "Permission denied", "Read-only", "Operation not permitted"))
    assert not target.parent.exists()


def test_collect_over_an_existing_file_keeps_it_when_refused(tmp_path):
    existing = save_episodes(_dataset(2), tmp_path / "x.h5")
    before = existing.read_bytes()
    refused("collect", "--episodes", 0, "--out", existing, names="", says="episodes must be >= 1")
    assert existing.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["x.h5"]


# ----------------------------------------------------------------------------- loaders that run code
def _call_name(node: ast.Call) -> str:
    parts, func = [], node.func
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
        if kw.arg is None:  # **kwargs: cannot be checked
            return kw
    return None


def _is_const(value, expected) -> bool:
    return isinstance(value, ast.Constant) and value.value is expected


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Calls that could execute code found in a file (or a model repository)."""
    problems = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            if {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"} & {*names, module}:
                problems.append(f"{filename}:{node.lineno}: imports a pickle-like module")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        last = name.rsplit(".", 1)[-1]
        where = f"{filename}:{node.lineno}: {name}"
        if name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
            problems.append(f"{where}(...) evaluates code")
        elif last in ("load", "loads", "Unpickler") and name.split(".")[0] in ("pickle", "cPickle", "dill",
                                                                                 "cloudpickle", "marshal", "joblib"):
            problems.append(f"{where} unpickles")
        elif name in ("np.load", "numpy.load"):
            if not _is_const(_keyword(node, "allow_pickle"), False):
                problems.append(f"{where} without allow_pickle=False")
        elif name == "torch.load":
            if not _is_const(_keyword(node, "weights_only"), True):
                problems.append(f"{where} without weights_only=True")
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            loader = _keyword(node, "Loader")
            if loader is None and len(node.args) > 1:
                loader = node.args[1]
            safe = isinstance(loader, (ast.Attribute, ast.Name)) and (
                getattr(loader, "attr", None) or getattr(loader, "id", "")) in ("SafeLoader", "CSafeLoader")
            if name != "yaml.load" or not safe:
                problems.append(f"{where} without SafeLoader")
        elif name.endswith(("pd.read_pickle", "pandas.read_pickle")) or last == "load_learnable":
            problems.append(f"{where} unpickles")
        trust = _keyword(node, "trust_remote_code")
        if _is_const(trust, True):
            problems.append(f"{where}(trust_remote_code=True) hard-coded")
    return problems


def test_the_package_has_no_loader_that_runs_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert problems == []


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.load(open('x', 'rb'))",
    "from pickle import loads",
    "import numpy as np\nnp.load('x.npz')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import torch\ntorch.load('m.pt')",
    "import torch\ntorch.load('m.pt', weights_only=False)",
    "import torch\ntorch.load('m.pt', **kw)",
    "AutoModel.from_pretrained(path, trust_remote_code=True)",
    "eval(line)",
    "exec(text)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.unsafe_load(text)",
    "algo = d3rlpy.load_learnable('x.d3')",
])
def test_the_scan_catches_each_unsafe_loader(snippet):
    assert unsafe_calls(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nnp.load('x.npz', allow_pickle=False)",
    "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.safe_load(text)",
    "AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)",
    "import json\njson.loads(text)",
])
def test_the_scan_accepts_safe_loaders(snippet):
    assert unsafe_calls(snippet) == []


@pytest.mark.parametrize(("value", "says"), [("100,x", "comma-separated step numbers"),
                                             ("5,50", "measure_at step 50")])
def test_ground_refuses_growth_steps_it_cannot_measure(tmp_path, good_data, value, says):
    out = tmp_path / "g"
    refused("ground", "--data", good_data, "--out", out, "--steps", 10, "--measure-at", value, names=value.split(",")[-1],
            says=says)
    assert not out.exists()
