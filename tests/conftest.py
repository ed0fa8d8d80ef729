"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama with the real SmolLM2 tokenizer, saved as a
    Hugging Face model directory (what ``--llm PATH`` accepts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kalm.grounding.backbone import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def grounded_model(tmp_path_factory, tiny_backbone) -> Path:
    """A tiny grounded model saved as `kalm ground` saves one: the random Llama, fully
    fine-tunable, with a done head that never fires (every rollout runs to its goal or
    to --max-steps, so sampling decides many actions)."""
    from kalm.envs import get_spec
    from kalm.grounding.model import GroundedLM, GroundedLMConfig, NormStats

    spec = get_spec("clevr")
    torch.manual_seed(0)
    config = GroundedLMConfig(env="clevr", state_dim=spec.state_dim, action_dim=spec.action_dim, discrete=True,
                              backbone=str(tiny_backbone), finetune="full")
    identity = NormStats.identity(spec.state_dim, spec.action_dim, True)
    stats = NormStats(np.zeros(spec.state_dim, np.float32), np.full(spec.state_dim, 0.3, np.float32),
                      np.full(spec.state_dim, 0.05, np.float32), identity.action_mean, identity.action_std)
    model = GroundedLM.create(config, stats)
    with torch.no_grad():
        model.io.done_head.bias.fill_(-20.0)
    return model.save(tmp_path_factory.mktemp("grounded") / "model")


class ObservationHashPolicy:
    """A deterministic evaluation policy whose action depends on every coordinate of the
    observation it is shown, recording what each episode showed it: one at a time
    (``begin``) or in lockstep (``begin_batch``), the records must match."""

    name = "observation-hash"

    def __init__(self, spec, batch_size: int):
        self.spec, self.batch_size, self.shown = spec, batch_size, []
        out = 1 if spec.discrete else spec.action_dim
        self.weights = np.random.default_rng(0).normal(size=(spec.state_dim, out))

    def _act(self, obs):
        value = np.sin(np.asarray(obs, dtype=np.float64) @ self.weights * 3)
        if self.spec.discrete:
            return int(abs(value[0]) * 1e6) % self.spec.action_space.n
        return value.astype(np.float32)

    def begin(self, env, instruction, start, rng):
        shown = []
        self.shown.append(shown)

        def act(obs):
            shown.append(np.array(obs, dtype=np.float64))
            return self._act(obs)

        return act

    def begin_batch(self, instructions, starts, rngs=None):
        rows = [[] for _ in instructions]
        self.shown += rows

        def act(observations, running=None):
            for shown, obs in zip(rows, observations):
                shown.append(np.array(obs, dtype=np.float64))
            return np.stack([np.asarray(self._act(obs)) for obs in observations])

        return act

    def same_as(self, other) -> bool:
        """Every episode was shown the same observations. A lockstep row keeps being
        asked after its episode ended, so the shorter record (the steps the episode
        used; the results compare those counts) is what must match."""
        def alike(a, b):
            n = min(len(a), len(b))
            return np.array_equal(np.stack(a[:n]), np.stack(b[:n]))

        return len(self.shown) == len(other.shown) and all(alike(a, b) for a, b in zip(self.shown, other.shown))


@pytest.fixture
def observation_hash_policy():
    return ObservationHashPolicy
