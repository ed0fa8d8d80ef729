"""Batched, KV-cached rollout generation with a grounded LLM.

The prompt (instruction + ``s_0``) is run through the model once; after that each step
feeds only the newest token: the action placeholder, then the state placeholder. The
layout is the one grounding trains: the action ``a_t`` and the done signal are read at
the ``s_t`` position, the next state ``s_{t+1}`` at the ``a_t`` position. (The
reference implementation read the action from the pass that predicted the state, so it
re-emitted the previous action and shipped rollouts with ``a_0 == a_1``.)

Rows are left-padded; the attention mask covers the cached tokens plus the new one and
position ids continue from each row's own prompt length, so padding never shifts a
row's positions. ``use_cache=False`` re-runs the whole sequence at every step, as the
reference did; it exists to check the cache and to measure what the cache saves.

Rows of a batch that share an instruction share its prefill: the prompt ends with the
``s_0`` placeholder, so everything before it is the same text for those rows. Each
distinct prompt is prefilled once without ``s_0``, its cache is copied to the rows that
share it (the cache's beam-search reorder), and each row then feeds its own ``s_0``. A
rephrased CLEVR prompt is ~30 tokens and a five-step rollout adds 10, so the prompt is
most of the tokens; measured with the grounded SmolLM2 (batch 64, T = 5, fp32, 2 cores,
``python -m benchmarks``): 4 start states per instruction gave 1.6x the rollouts/s,
8 gave 1.9x (the one-token steps cost what they did).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

StopFn = Callable[[int, np.ndarray], bool]


def stop_at_goal(tasks: Sequence, starts: Sequence[np.ndarray], limits: Sequence[int]) -> StopFn:
    """A stop function for :func:`generate_rollouts`: rollout ``k`` ends at the first
    imagined state where ``tasks[k]`` holds (from ``starts[k]``), or after ``limits[k]``
    steps (the task's horizon, or a composed segment's length)."""
    taken = np.zeros(len(tasks), dtype=np.int64)

    def stop(k: int, state: np.ndarray) -> bool:
        taken[k] += 1
        return bool(tasks[k].success(state, starts[k])) or taken[k] >= limits[k]

    return stop


@dataclass(frozen=True)
class GenerationConfig:
    """How rollouts are sampled.

    ``max_steps`` counts environment steps: a source that imagines in waypoints
    (``EnvSpec.waypoints``) generates ``max_steps // every`` of them.
    ``temperature`` 0 means greedy actions; above 0 actions are sampled from the
    softened distribution (discrete) or perturbed by Gaussian noise of that scale in
    normalised units (continuous). States are always the regressed mean.
    """

    max_steps: int = 50
    # 64 rollouts at a time: 128 five-step rollouts of the grounded SmolLM2 took 6.3 s
    # in batches of 64 against 9.5 s in batches of 16 (2 CPU cores, side by side).
    batch_size: int = 64
    temperature: float = 0.0
    use_cache: bool = True
    # Rows with the same instruction prefill it once (with the cache on); off only to
    # check and time what the sharing saves.
    share_prefill: bool = True
    stop_on_done: bool = True
    done_threshold: float = 0.5


@dataclass(frozen=True)
class GeneratedRollout:
    """One imagined trajectory: ``states`` (T+1, state_dim), ``actions`` (T,) or (T, a)."""

    instruction: str
    states: np.ndarray
    actions: np.ndarray
    stopped_by: str  # "done" (the model's signal), "stop" (the caller's stop function), or "horizon"


class RolloutSource(Protocol):
    """What imagination draws rollouts from: the grounded LLM (:class:`LLMRollouts`) or
    the ablation without one (:class:`~kalm.imagine.without_llm.PolicyDynamicsRollouts`).

    ``step_scale`` is the per-coordinate size of one step's change, the noise unit of
    the robustness filter; ``every`` is the environment steps per generated step (the
    stop function is asked once per generated step; rollouts come back per step);
    ``describe()`` goes into the imagined file's metadata.
    """

    step_scale: np.ndarray
    every: int

    def generate(self, instructions: Sequence[str], initial_states: np.ndarray, config: GenerationConfig,
                 stop: StopFn | None, seed: int, progress: Callable[[int], None] | None,
                 carried_state: Sequence[tuple],
                 prompt_ids: Sequence[int] | None = None) -> list[GeneratedRollout]: ...

    def describe(self) -> dict: ...


def batch_generator(seed: int, prompt_ids: Sequence[int] | None, start: int, device="cpu") -> torch.Generator:
    """The sampling generator of the generation batch that begins at input ``start``:
    seeded by the seed and the batch's first prompt number (``prompt_ids[start]``, or
    ``start``), not by what ran before it, so a batch samples alike in whichever
    process of a sharded imagination it runs (:mod:`kalm.parallel`)."""
    first = start if prompt_ids is None else int(prompt_ids[start])
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, first]).generate_state(1)[0]))


class LLMRollouts:
    """The grounded LLM as a :class:`RolloutSource` (:func:`generate_rollouts`).

    Given the environment's ``waypoints`` (the time scale it was grounded at), the LLM
    imagines waypoints and each rollout is decoded into per-step transitions."""

    def __init__(self, model, waypoints=None):
        self.model = model
        self.waypoints = waypoints
        self.every = waypoints.every if waypoints is not None else 1
        # a waypoint step's change spread over its steps, as a random walk spreads
        self.step_scale = model.io.delta_std.detach().cpu().numpy() / np.sqrt(self.every)

    def generate(self, instructions, initial_states, config, stop, seed, progress, carried_state, prompt_ids=None):
        if self.waypoints is None:
            return generate_rollouts(self.model, instructions, initial_states, config, stop=stop, seed=seed,
                                     progress=progress, carried_state=carried_state, prompt_ids=prompt_ids)
        config = replace(config, max_steps=max(1, config.max_steps // self.every))
        rollouts = generate_rollouts(self.model, instructions, initial_states, config, stop=stop, seed=seed,
                                     progress=progress, carried_state=self.waypoints.carried_state,
                                     prompt_ids=prompt_ids)
        return [GeneratedRollout(r.instruction, *self.waypoints.decode(r.states, r.actions), r.stopped_by)
                for r in rollouts]

    def describe(self) -> dict:
        return {"source": "imagined", "model": str(getattr(self.model.config, "backbone", "")),
                "precision": str(self.model.inference_dtype).removeprefix("torch.")}


class CachedSequence:
    """The growing batch: prompt embeddings, then one embedding per generated token
    (shared by the generator and the LLM policy, which feeds real states instead)."""

    def __init__(self, model, prompt: dict, device: torch.device):
        self.model = model
        ids = prompt["input_ids"].to(device)
        self.prompt_embeds = model.embed_sequence(ids, prompt["states"].to(device), prompt["actions"].to(device))
        self.mask = prompt["attention_mask"].to(device)
        self.positions = prompt["position_ids"].to(device)
        self.new_embeds: list[torch.Tensor] = []
        self.cache = None

    def _append_mask(self) -> None:
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)

    def start(self, use_cache: bool) -> torch.Tensor:
        hidden, self.cache = self.model(self.prompt_embeds, self.mask, self.positions, None, use_cache=use_cache)
        return hidden[:, -1]

    def start_shared(self, rows: torch.Tensor, initial_states: torch.Tensor) -> torch.Tensor | None:
        """Prefill each distinct prompt (one per row of this sequence) without its final
        ``s_0`` placeholder, give row ``i`` of the real batch the cache of prompt
        ``rows[i]``, then feed every row its own ``s_0``. ``None`` when the backbone's
        cache cannot be copied between rows (the caller then prefills every row)."""
        _, cache = self.model(self.prompt_embeds[:, :-1], self.mask[:, :-1], self.positions[:, :-1], None,
                              use_cache=True)
        if not hasattr(cache, "reorder_cache"):
            return None
        cache.reorder_cache(rows)
        self.cache = cache
        self.mask, self.positions = self.mask[rows, :-1], self.positions[rows, :-1]
        self.prompt_embeds = None
        return self.feed(self.model.embed_states(initial_states), use_cache=True)

    def feed(self, embeds: torch.Tensor, use_cache: bool) -> torch.Tensor:
        """Append one token per row and return the hidden state at it."""
        self._append_mask()
        if use_cache:
            hidden, self.cache = self.model(embeds, self.mask, self.positions[:, -1:], self.cache, use_cache=True)
            return hidden[:, -1]
        self.new_embeds.append(embeds)
        full = torch.cat([self.prompt_embeds, *self.new_embeds], dim=1)
        hidden, _ = self.model(full, self.mask, self.positions, None, use_cache=False)
        return hidden[:, -1]


EMPTY_SLOT_TOLERANCE = 1e-6


def carry_state(state, previous, blocks: Sequence[tuple]):
    """``state`` with each ``(destination, source, length)`` block copied from
    ``previous`` (an environment's ``carried_state``: parts of the next state that the
    physics copies, like a stacked frame). A block with a fourth element ``True`` is
    copied only in rows where ``previous``'s source block is empty (all zeros): an
    empty slot stays empty, a filled one follows the prediction. Works on torch tensors
    and numpy arrays of shape ``(batch, state_dim)``."""
    if not blocks:
        return state
    state = state.clone() if isinstance(state, torch.Tensor) else state.copy()
    for block in blocks:
        destination, source, length = block[:3]
        copied = previous[:, source : source + length]
        if len(block) > 3 and block[3]:
            empty = (abs(copied) <= EMPTY_SLOT_TOLERANCE).all(1)
            state[empty, destination : destination + length] = copied[empty]
        else:
            state[:, destination : destination + length] = copied
    return state


def _choose_actions(model, hidden: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    out = model.predict_action(hidden)
    if model.config.discrete:
        if temperature <= 0:
            return out.argmax(-1)
        probs = torch.softmax(out / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if temperature > 0:
        noise = torch.randn(out.shape, generator=generator, device=out.device)
        out = out + temperature * noise * model.io.action_std
    return out


def prefill(model, instructions: Sequence[str], initial_states: np.ndarray, config: GenerationConfig,
            device: torch.device) -> tuple[CachedSequence, torch.Tensor]:
    """The sequence after the prompts, and the hidden state at each row's ``s_0``;
    rows with the same instruction share one prefill when the cache is on."""
    first_row: dict[str, int] = {}
    for i, text in enumerate(instructions):
        first_row.setdefault(text, i)
    if config.use_cache and config.share_prefill and len(first_row) < len(instructions):
        distinct = list(first_row)
        prompts = model.build_generation_prompt(distinct, initial_states[list(first_row.values())])
        seq = CachedSequence(model, prompts, device)
        prompt_of = {text: k for k, text in enumerate(distinct)}
        rows = torch.as_tensor([prompt_of[t] for t in instructions], device=device)
        hidden = seq.start_shared(rows, torch.as_tensor(initial_states, dtype=torch.float32, device=device))
        if hidden is not None:
            return seq, hidden
    seq = CachedSequence(model, model.build_generation_prompt(list(instructions), initial_states), device)
    return seq, seq.start(config.use_cache)


@torch.no_grad()
def _generate_batch(
    model, instructions: Sequence[str], initial_states: np.ndarray, config: GenerationConfig,
    stop: StopFn | None, generator: torch.Generator, offset: int, carried: Sequence[tuple],
) -> list[GeneratedRollout]:
    device = next(model.parameters()).device
    batch = len(instructions)
    seq, hidden = prefill(model, instructions, initial_states, config, device)
    state = torch.as_tensor(initial_states, dtype=torch.float32, device=device)
    states, actions = [state.cpu().numpy()], []
    ended = np.full(batch, -1)  # number of actions when the row stopped
    reason = ["horizon"] * batch
    for t in range(config.max_steps):
        if config.stop_on_done and t > 0:
            done = (torch.sigmoid(model.predict_done(hidden)) > config.done_threshold).cpu().numpy()
            for i in np.flatnonzero(done & (ended < 0)):
                ended[i], reason[i] = t, "done"
        if np.all(ended >= 0):
            break
        action = _choose_actions(model, hidden, config.temperature, generator)
        hidden_at_action = seq.feed(model.embed_actions(action), config.use_cache)
        state = carry_state(model.predict_state(hidden_at_action, state), state, carried)
        actions.append(action.cpu().numpy())
        states.append(state.cpu().numpy())
        if stop is not None:
            for i in np.flatnonzero(ended < 0):
                if stop(offset + i, states[-1][i]):
                    ended[i], reason[i] = t + 1, "stop"
        if np.all(ended >= 0):
            break
        hidden = seq.feed(model.embed_states(state), config.use_cache)
    all_states, all_actions = np.stack(states, axis=1), np.stack(actions, axis=1) if actions else None
    rollouts = []
    for i in range(batch):
        n = int(ended[i]) if ended[i] >= 0 else len(actions)
        acts = all_actions[i, :n] if all_actions is not None else np.zeros((0,), dtype=np.int64)
        rollouts.append(GeneratedRollout(instructions[i], all_states[i, : n + 1].astype(np.float32), acts, reason[i]))
    return rollouts


def generate_rollouts(
    model,
    instructions: Sequence[str],
    initial_states: np.ndarray,
    config: GenerationConfig = GenerationConfig(),
    stop: StopFn | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    carried_state: Sequence[tuple] = (),
    prompt_ids: Sequence[int] | None = None,
) -> list[GeneratedRollout]:
    """Imagine one rollout per (instruction, initial state), ``config.batch_size`` at a time.

    ``stop(index, state)`` is asked after every generated state (``index`` into the
    inputs); returning True ends that rollout there, e.g. when the task's success
    predicate holds on the imagined state. ``carried_state`` blocks are copied from
    each state into the next (see :func:`carry_state`). ``prompt_ids`` number the
    inputs within a larger run (default ``0..n-1``): sampling is seeded per batch by
    them (:func:`batch_generator`).
    """
    initial_states = np.asarray(initial_states, dtype=np.float32)
    if len(instructions) != len(initial_states):
        raise ValueError(f"{len(instructions)} instructions but {len(initial_states)} initial states")
    model.eval()
    device = next(model.parameters()).device
    out: list[GeneratedRollout] = []
    for start in range(0, len(instructions), config.batch_size):
        end = min(start + config.batch_size, len(instructions))
        out += _generate_batch(
            model, instructions[start:end], initial_states[start:end], config, stop,
            batch_generator(seed, prompt_ids, start, device), start, carried_state,
        )
        if progress is not None:
            progress(end - start)
    return out
