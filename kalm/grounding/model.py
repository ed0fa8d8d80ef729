"""A causal LM that reads and writes states and actions.

:class:`GroundedLM` wraps any Hugging Face causal LM. Two placeholder tokens are
*added* to its tokenizer (ids looked up, never hard-coded); at their positions the
token embedding is replaced, through ``inputs_embeds``, by a learned encoding of the
number: an MLP for states, an ``nn.Embedding`` for discrete actions or an MLP for
continuous ones (chosen from the env's action space, never from its name). Heads on
the final hidden states read states, actions, a done signal, and (the LM head) text.

States are normalised with dataset statistics that travel with the checkpoint. The
state head predicts the *change* from a reference state (the previous state in the
sequence) in units of the dataset's per-step change: most coordinates of a physical
state barely move in one step, and a residual lets the model spend its capacity on
the ones that do, which is what beating the copy-the-state baseline requires.

Token layout of a trajectory (see :mod:`kalm.grounding.prompts`): the hidden state at
``s_t`` gives ``a_t`` and done, the hidden state at ``a_t`` gives ``s_{t+1}``.

Saving and loading live in :mod:`kalm.grounding.checkpoint`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kalm.grounding.backbone import add_placeholder_tokens, keep_first_layers, load_backbone, resize_embeddings
from kalm.grounding.prompts import PromptBuilder, collate

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapters: one definition for the training recipe
    (:class:`~kalm.grounding.finetune.GroundingConfig`) and for the checkpoint's record
    of what was built (:class:`GroundedLMConfig`). ``targets`` that a backbone lacks
    are skipped (at least one must exist)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS


@dataclass(frozen=True)
class GroundedLMConfig:
    """What is needed to rebuild a :class:`GroundedLM` around its backbone.

    ``env``/``state_dim``/``action_dim``/``discrete`` pin the checkpoint to an
    environment's shapes; ``backbone`` is the base model (a path or an embedded name)
    that a LoRA checkpoint is applied to.
    """

    env: str
    state_dim: int
    action_dim: int
    discrete: bool
    backbone: str
    finetune: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    io_hidden: int = 256
    state_token: str = "<|state|>"
    action_token: str = "<|action|>"
    base_vocab_size: int = field(default=0)
    layers: int = 0  # the backbone's first decoder blocks kept (0: all of them)

    def __post_init__(self):
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"finetune must be 'lora' or 'full', got {self.finetune!r}")
        if self.layers < 0:
            raise ValueError(f"layers must be 0 (all) or positive, got {self.layers}")
        if self.state_dim <= 0 or self.action_dim <= 0:
            raise ValueError(f"state_dim and action_dim must be positive, got {self.state_dim}, {self.action_dim}")

@dataclass(frozen=True)
class NormStats:
    """Dataset statistics: states are fed as ``(s - mean) / std``; state changes are
    predicted in units of ``delta_std``; continuous actions as ``(a - mean) / std``."""

    state_mean: np.ndarray
    state_std: np.ndarray
    delta_std: np.ndarray
    action_mean: np.ndarray
    action_std: np.ndarray

    @classmethod
    def from_arrays(cls, observations: list[np.ndarray], actions: list[np.ndarray], discrete: bool) -> NormStats:
        """Statistics over episodes' ``(T+1, state_dim)`` observations and ``(T, ...)`` actions."""
        states = np.concatenate(observations).astype(np.float64)
        deltas = np.concatenate([np.diff(o, axis=0) for o in observations]).astype(np.float64)
        floor = 1e-3
        if discrete:
            a_mean, a_std = np.zeros(1), np.ones(1)
        else:
            acts = np.concatenate(actions).astype(np.float64)
            a_mean, a_std = acts.mean(0), np.maximum(acts.std(0), floor)
        return cls(
            state_mean=states.mean(0).astype(np.float32),
            state_std=np.maximum(states.std(0), floor).astype(np.float32),
            delta_std=np.maximum(np.sqrt((deltas**2).mean(0)), floor).astype(np.float32),
            action_mean=np.asarray(a_mean, np.float32),
            action_std=np.asarray(a_std, np.float32),
        )

    @classmethod
    def identity(cls, state_dim: int, action_dim: int, discrete: bool) -> NormStats:
        a = 1 if discrete else action_dim
        return cls(np.zeros(state_dim, np.float32), np.ones(state_dim, np.float32), np.ones(state_dim, np.float32),
                   np.zeros(a, np.float32), np.ones(a, np.float32))


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_hidden), nn.SiLU(),
                         nn.Linear(n_hidden, n_out))


class _ScaledEncoder(nn.Module):
    """MLP whose output is RMS-normalised to the size of the LLM's token embeddings,
    so injected vectors start on the scale the transformer expects."""

    def __init__(self, n_in: int, n_hidden: int, hidden_size: int, embedding_rms: float):
        super().__init__()
        self.mlp = _mlp(n_in, n_hidden, hidden_size)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.fill_(embedding_rms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(x).float())  # fp32 norm also under bf16 autocast


class IOLayers(nn.Module):
    """The new layers: encoders for injected values and heads that read them back."""

    def __init__(self, config: GroundedLMConfig, hidden_size: int, embedding_rms: float, stats: NormStats):
        super().__init__()
        h, k = config.io_hidden, config.action_dim
        self.state_encoder = _ScaledEncoder(config.state_dim, h, hidden_size, embedding_rms)
        if config.discrete:
            self.action_encoder = nn.Embedding(k, hidden_size)
            nn.init.normal_(self.action_encoder.weight, std=embedding_rms)
        else:
            self.action_encoder = _ScaledEncoder(k, h, hidden_size, embedding_rms)
        self.state_head = _mlp(hidden_size, h, config.state_dim)
        self.action_head = _mlp(hidden_size, h, k)
        self.done_head = nn.Linear(hidden_size, 1)
        for name in ("state_mean", "state_std", "delta_std", "action_mean", "action_std"):
            self.register_buffer(name, torch.as_tensor(getattr(stats, name), dtype=torch.float32).clone())


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU, or a CPU with
    AVX512-BF16 or AMX (elsewhere bf16 matmuls are emulated and slower than fp32)."""
    if torch.cuda.is_available():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _lora_targets(llm, wanted: tuple[str, ...]) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
    targets = [t for t in wanted if t in present]
    if not targets:
        raise ValueError(f"none of the LoRA target modules {list(wanted)} exist in this model")
    return targets


class GroundedLM(nn.Module):
    """The grounded language model. Build with :meth:`create`, restore with :meth:`load`.

    The API the imagination module uses (all tensors batch-first):

    - ``build_generation_prompt(instructions, initial_states)`` -> a left-padded batch
      ending at the ``s_0`` placeholder;
    - ``embed_sequence(input_ids, states, actions)`` -> ``(B, L, H)`` embeddings, and
      ``embed_states(states)`` / ``embed_actions(actions)`` for one new token each;
    - ``forward(inputs_embeds, attention_mask, position_ids, past_key_values,
      use_cache)`` -> ``(hidden (B, L, H), cache)``;
    - ``predict_action(hidden)``, ``predict_done(hidden)`` (read at ``s_t``),
      ``predict_state(hidden, previous_state)`` (read at ``a_t``), ``token_logits``.
    """

    def __init__(self, llm, tokenizer, config: GroundedLMConfig, io: IOLayers):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.config = config
        self.io = io
        self.prompts = PromptBuilder(tokenizer, config.state_token, config.action_token, config.state_dim,
                                     config.action_dim, config.discrete)
        self.state_token_id = self.prompts.state_token_id
        self.action_token_id = self.prompts.action_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else tokenizer.eos_token_id)
        self.merged = False
        self.inference_dtype = torch.float32
        decoder = self.decoder
        self._cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    # ---------------------------------------------------------------- construction
    @classmethod
    def create(cls, config: GroundedLMConfig, stats: NormStats, llm=None, tokenizer=None) -> GroundedLM:
        """A fresh model around a backbone (loaded from ``config.backbone`` unless given)."""
        if llm is None or tokenizer is None:
            llm, tokenizer = load_backbone(config.backbone)
        keep_first_layers(llm, config.layers)
        base_vocab = llm.get_input_embeddings().weight.shape[0]
        config = replace(config, base_vocab_size=int(base_vocab))
        add_placeholder_tokens(tokenizer, (config.state_token, config.action_token))
        resize_embeddings(llm, len(tokenizer))
        rms = float(llm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        io = IOLayers(config, llm.config.hidden_size, rms, stats)
        llm = cls._prepare_finetuning(llm, config)
        return cls(llm, tokenizer, config, io)

    @staticmethod
    def _prepare_finetuning(llm, config: GroundedLMConfig):
        if config.finetune == "full":
            llm.requires_grad_(True)
            return llm
        from peft import LoraConfig, get_peft_model

        settings = config.lora
        lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=_lora_targets(llm, settings.targets), bias="none")
        return get_peft_model(llm, lora)

    @property
    def decoder(self):
        """The transformer body (no LM head); LoRA layers live inside it."""
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return base.get_decoder()

    # ---------------------------------------------------------------- embedding
    def normalize_states(self, states: torch.Tensor) -> torch.Tensor:
        return (states.float() - self.io.state_mean) / self.io.state_std

    def embed_sequence(self, input_ids: torch.Tensor, states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Token embeddings with encoded states/actions at the placeholder positions.

        ``states`` is ``(B, L, state_dim)`` and ``actions`` ``(B, L)`` (discrete) or
        ``(B, L, action_dim)``, aligned with ``input_ids``; values at other positions
        are ignored.
        """
        tokens = self.llm.get_input_embeddings()(input_ids)
        is_state = (input_ids == self.state_token_id).unsqueeze(-1)
        is_action = (input_ids == self.action_token_id).unsqueeze(-1)
        encoded_states = self.io.state_encoder(self.normalize_states(states)).to(tokens.dtype)
        encoded_actions = self._encode_actions(actions, valid=is_action.squeeze(-1)).to(tokens.dtype)
        return torch.where(is_action, encoded_actions, torch.where(is_state, encoded_states, tokens))

    def _encode_actions(self, actions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.discrete:
            actions = actions.long()
            if valid is not None:
                actions = torch.where(valid, actions, torch.zeros_like(actions))
            if actions.numel() and (actions.min() < 0 or actions.max() >= self.config.action_dim):
                raise ValueError(f"discrete actions must lie in [0, {self.config.action_dim}), got "
                                 f"{int(actions.min())}..{int(actions.max())}")
            return self.io.action_encoder(actions)
        return self.io.action_encoder((actions.float() - self.io.action_mean) / self.io.action_std)

    def embed_states(self, states: torch.Tensor) -> torch.Tensor:
        """``(B, state_dim)`` -> ``(B, 1, H)``: one state placeholder token per row."""
        ids = torch.full((states.shape[0], 1), self.state_token_id, device=states.device)
        dummy = torch.zeros((states.shape[0], 1, *self._action_shape()), device=states.device)
        return self.embed_sequence(ids, states[:, None], dummy)

    def embed_actions(self, actions: torch.Tensor) -> torch.Tensor:
        """``(B,)`` or ``(B, action_dim)`` -> ``(B, 1, H)``: one action placeholder per row."""
        ids = torch.full((actions.shape[0], 1), self.action_token_id, device=actions.device)
        dummy = torch.zeros((actions.shape[0], 1, self.config.state_dim), device=actions.device)
        return self.embed_sequence(ids, dummy, actions[:, None])

    def _action_shape(self) -> tuple[int, ...]:
        return () if self.config.discrete else (self.config.action_dim,)

    # ---------------------------------------------------------------- transformer
    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False):
        """Run the transformer body: ``(hidden (B, L, H), cache or None)``.

        Pass ``position_ids`` with left-padded batches (``cumsum(mask) - 1``); the
        attention mask always covers the cached tokens plus the new ones.
        """
        kwargs = {self._cache_kwarg: past_key_values}
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=use_cache, **kwargs)
        cache = getattr(out, "cache", None) if self._cache_kwarg == "cache" else out.past_key_values
        return out.last_hidden_state, cache

    # ---------------------------------------------------------------- heads
    def predict_action(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., n_actions)`` (discrete) or the action ``(..., action_dim)``."""
        out = self.io.action_head(hidden.float())
        if self.config.discrete:
            return out
        return out * self.io.action_std + self.io.action_mean

    def predict_state_change(self, hidden: torch.Tensor) -> torch.Tensor:
        """The state change in units of the dataset's per-step change (the trained output)."""
        return self.io.state_head(hidden.float())

    def predict_state(self, hidden: torch.Tensor, previous_state: torch.Tensor) -> torch.Tensor:
        """The next state in raw units: ``previous_state`` plus the predicted change."""
        return previous_state.float() + self.predict_state_change(hidden) * self.io.delta_std

    def predict_done(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logit that the episode ends at this state (read at an ``s_t`` position)."""
        return self.io.done_head(hidden.float()).squeeze(-1)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.get_output_embeddings()(hidden)

    # ---------------------------------------------------------------- prompts
    def build_generation_prompt(self, instructions, initial_states) -> dict:
        """Left-padded batch ``{input_ids, states, actions, attention_mask, position_ids}``
        ending at each row's ``s_0`` placeholder; the last column's hidden state gives
        ``a_0`` and done."""
        if isinstance(instructions, str):
            instructions, initial_states = [instructions], np.asarray(initial_states)[None]
        initial_states = np.asarray(initial_states, dtype=np.float32)
        if initial_states.shape != (len(instructions), self.config.state_dim):
            raise ValueError(f"initial states must be ({len(instructions)}, {self.config.state_dim}), "
                             f"got {initial_states.shape}")
        examples = [self.prompts.generation_prompt(i, s) for i, s in zip(instructions, initial_states)]
        return collate(examples, self.pad_token_id, left_pad=True)

    # ---------------------------------------------------------------- inference
    def merge_lora(self) -> GroundedLM:
        """Fold the LoRA weights into the backbone for inference (no-op when fully
        fine-tuned).

        Why: an un-merged LoRA layer runs two extra small matmuls per projection, and
        for the one-token steps of cached generation that per-call overhead is a large
        share of the step (7 projections x every layer). A merged model cannot be saved
        as an adapter any more, so :meth:`save` refuses it.
        """
        if self.config.finetune == "lora" and not self.merged:
            self.llm = self.llm.merge_and_unload()
            self.merged = True
        return self.eval()

    def use_inference_precision(self, precision: str = "auto") -> GroundedLM:
        """Run the transformer body in bf16 (``"bf16"``), in fp32 (``"fp32"``), or in
        bf16 where the hardware computes it natively (``"auto"``: CUDA, or a CPU with
        AVX512-BF16 / AMX). The I/O layers stay fp32 (the heads read ``hidden.float()``).

        Why: a cached generation step feeds one token per row, so it streams every
        weight from memory for a few dozen tokens; bf16 halves those bytes and runs on
        the CPU's bf16 units (2.3x the rollouts/s on 2 cores, with as many imagined
        rollouts kept; docs/imagination.md). The cast cannot be undone without loss, so a
        bf16 model refuses :meth:`save`.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        wanted = torch.bfloat16 if precision == "bf16" or (precision == "auto" and native_bf16()) else torch.float32
        if wanted == self.inference_dtype:
            return self
        if wanted == torch.float32:
            raise ValueError("this model already runs in bf16; load it again for fp32")
        self.llm.to(wanted)
        self.inference_dtype = wanted
        return self

    # ---------------------------------------------------------------- save / load
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (see :func:`kalm.grounding.checkpoint.save_grounded`)."""
        from kalm.grounding.checkpoint import save_grounded

        return save_grounded(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, spec=None, trainable: bool = False, backbone: str | None = None
             ) -> GroundedLM:
        """Restore a checkpoint (see :func:`kalm.grounding.checkpoint.load_grounded`)."""
        from kalm.grounding.checkpoint import load_grounded

        return load_grounded(directory, spec, trainable, backbone)
