"""The four grounding tasks as token sequences with state/action placeholders.

Each task is a template whose ``{state}`` / ``{action}`` / ``{trajectory}`` markers
become single placeholder tokens; the model overwrites their embeddings with the
encoded numbers. The layout of a trajectory is fixed because imagination relies on it:

    s_0 a_0 s_1 a_1 ... s_T          (one placeholder token each)

- the hidden state AT ``s_t`` predicts the action ``a_t`` and whether the episode
  ends at ``s_t`` (the done signal);
- the hidden state AT ``a_t`` predicts ``s_{t+1}``, as a change from ``s_t``.

So a generator appends ``a_t`` after reading it at ``s_t`` and never re-predicts the
previous action (the original implementation's off-by-one, reference §9.2).

Supervision is attached per position (targets aligned with the tokens), so a batch
needs no magic offsets: text loss covers exactly the instruction tokens and the EOS
that ends them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TASKS: tuple[str, ...] = ("dynamics", "explanation", "generation", "goal")

# {state}/{action} are single placeholders; {trajectory} is s_0 a_0 ... s_T; the
# instruction is written with a leading space (no space token dangles before it).
TEMPLATES: dict[str, str] = {
    "dynamics": "Predict the next state.\nState:{state} Action:{action}",
    "explanation": "Describe the trajectory.\nTrajectory:{trajectory}\nInstruction:{instruction}",
    "generation": "Follow the instruction.\nInstruction:{instruction}\nTrajectory:{trajectory}",
    "goal": "Predict the final state.\nInstruction:{instruction}\nStart:{state} Final state:",
}
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenised sequence with its injected values and per-position targets.

    Every array has the sequence length ``L`` as its first axis. Target rows hold what
    the hidden state at that position must predict; ``*_mask`` says where they count.
    """

    task: str
    input_ids: np.ndarray  # (L,) int64
    states: np.ndarray  # (L, state_dim) values injected at state placeholders
    actions: np.ndarray  # (L,) int64 or (L, action_dim) values injected at action placeholders
    state_targets: np.ndarray  # (L, state_dim) the state predicted at this position
    state_reference: np.ndarray  # (L, state_dim) the state the prediction is a change from
    state_mask: np.ndarray  # (L,) bool
    action_targets: np.ndarray  # (L,) int64 or (L, action_dim)
    action_mask: np.ndarray  # (L,) bool
    done_targets: np.ndarray  # (L,) float32
    done_mask: np.ndarray  # (L,) bool
    token_targets: np.ndarray  # (L,) int64, the next token, IGNORE_INDEX where unsupervised

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class _Writer:
    """Appends text pieces and placeholders, remembering where each placeholder went."""

    def __init__(self, builder: PromptBuilder):
        self.b = builder
        self.ids: list[int] = []
        self.state_at: dict[int, np.ndarray] = {}
        self.action_at: dict[int, np.ndarray | int] = {}

    def text(self, text: str) -> tuple[int, int]:
        ids = self.b.encode_text(text)
        start = len(self.ids)
        self.ids.extend(ids)
        return start, len(self.ids)

    def state(self, value: np.ndarray) -> int:
        self.ids.append(self.b.state_token_id)
        self.state_at[len(self.ids) - 1] = np.asarray(value, dtype=np.float32)
        return len(self.ids) - 1

    def action(self, value) -> int:
        self.ids.append(self.b.action_token_id)
        self.action_at[len(self.ids) - 1] = value
        return len(self.ids) - 1

    def trajectory(self, observations: np.ndarray, actions: np.ndarray) -> tuple[list[int], list[int]]:
        """``s_0 a_0 ... s_T``; returns the state and the action positions."""
        state_pos, action_pos = [self.state(observations[0])], []
        for t in range(len(actions)):
            action_pos.append(self.action(actions[t]))
            state_pos.append(self.state(observations[t + 1]))
        return state_pos, action_pos

    def example(self, task: str) -> Example:
        b = self.b
        n = len(self.ids)
        action_shape = (n,) if b.discrete else (n, b.action_dim)
        action_dtype = np.int64 if b.discrete else np.float32
        ex = Example(
            task=task,
            input_ids=np.asarray(self.ids, dtype=np.int64),
            states=np.zeros((n, b.state_dim), np.float32),
            actions=np.zeros(action_shape, action_dtype),
            state_targets=np.zeros((n, b.state_dim), np.float32),
            state_reference=np.zeros((n, b.state_dim), np.float32),
            state_mask=np.zeros(n, bool),
            action_targets=np.zeros(action_shape, action_dtype),
            action_mask=np.zeros(n, bool),
            done_targets=np.zeros(n, np.float32),
            done_mask=np.zeros(n, bool),
            token_targets=np.full(n, IGNORE_INDEX, np.int64),
        )
        for pos, value in self.state_at.items():
            ex.states[pos] = value
        for pos, value in self.action_at.items():
            ex.actions[pos] = value
        return ex


class PromptBuilder:
    """Turns episodes into :class:`Example` sequences for one tokenizer and env shape.

    Placeholder ids are looked up by token text, never hard-coded; the tokenizer must
    already contain them (:func:`kalm.grounding.model.add_placeholder_tokens`).
    """

    def __init__(self, tokenizer, state_token: str, action_token: str, state_dim: int, action_dim: int, discrete: bool):
        self.tokenizer = tokenizer
        self.state_dim = state_dim
        self.action_dim = action_dim
        self.discrete = discrete
        self.state_token_id = _token_id(tokenizer, state_token)
        self.action_token_id = _token_id(tokenizer, action_token)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; explanation targets need one to end")
        self.eos_token_id = int(tokenizer.eos_token_id)
        self._cache: dict[str, list[int]] = {}

    def encode_text(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def _render(self, task: str, writer: _Writer, fill: dict) -> dict:
        """Write a template, calling ``fill[marker]`` for each marker; returns their results."""
        template = TEMPLATES[task]
        results: dict = {}
        rest = template
        while "{" in rest:
            before, _, tail = rest.partition("{")
            marker, _, rest = tail.partition("}")
            if before:
                writer.text(before)
            results[marker] = fill[marker]()
        if rest:
            writer.text(rest)
        return results

    # ---------------------------------------------------------------- the four tasks
    def dynamics(self, state: np.ndarray, action, next_state: np.ndarray) -> Example:
        """s, a -> s': the next state is read at the action placeholder."""
        w = _Writer(self)
        pos = self._render("dynamics", w, {"state": lambda: w.state(state), "action": lambda: w.action(action)})
        ex = w.example("dynamics")
        a = pos["action"]
        ex.state_targets[a], ex.state_reference[a], ex.state_mask[a] = next_state, state, True
        return ex

    def explanation(self, observations: np.ndarray, actions: np.ndarray, instruction: str | None) -> Example:
        """s_0 a_0 ... s_T -> instruction text (CE on the instruction and its EOS).

        With ``instruction=None`` the sequence stops after ``Instruction:``: the
        prompt a decoder continues.
        """
        w = _Writer(self)
        spans = {}

        def instruction_text():
            if instruction is None:
                return None
            spans["start"], spans["end"] = w.text(" " + instruction.strip())
            w.ids.append(self.eos_token_id)
            return None

        self._render(
            "explanation",
            w,
            {"trajectory": lambda: w.trajectory(observations, actions), "instruction": instruction_text},
        )
        ex = w.example("explanation")
        if instruction is not None:
            # position i predicts token i+1: from the last prompt token to the one before EOS
            first, last = spans["start"] - 1, spans["end"]
            ex.token_targets[first:last] = ex.input_ids[first + 1 : last + 1]
        return ex

    def generation(self, observations: np.ndarray, actions: np.ndarray, instruction: str, ends: bool) -> Example:
        """instruction + s_0 -> a_0 s_1 a_1 ... (teacher forcing) with the done signal.

        ``ends`` says whether the episode really ends at the last state given (it
        terminated, and the window reaches its end); otherwise the last state's done
        target is left out rather than claimed false.
        """
        w = _Writer(self)
        pos = self._render(
            "generation",
            w,
            {"instruction": lambda: w.text(" " + instruction.strip()),
             "trajectory": lambda: w.trajectory(observations, actions)},
        )
        state_pos, action_pos = pos["trajectory"]
        ex = w.example("generation")
        for t, p in enumerate(action_pos):
            ex.action_targets[state_pos[t]] = actions[t]
            ex.action_mask[state_pos[t]] = True
            ex.done_mask[state_pos[t]] = True  # done_targets stays 0: the episode goes on
            ex.state_targets[p], ex.state_reference[p], ex.state_mask[p] = observations[t + 1], observations[t], True
        if ends:
            ex.done_targets[state_pos[-1]], ex.done_mask[state_pos[-1]] = 1.0, True
        return ex

    def generation_prompt(self, instruction: str, initial_state: np.ndarray) -> Example:
        """The generation prompt up to and including the ``s_0`` placeholder."""
        empty_actions = np.zeros((0,) if self.discrete else (0, self.action_dim))
        return self.generation(np.asarray(initial_state)[None], empty_actions, instruction, ends=False)

    def goal(self, initial_state: np.ndarray, instruction: str, final_state: np.ndarray) -> Example:
        """instruction + s_0 -> the final state, read at the sequence's last token."""
        w = _Writer(self)
        self._render(
            "goal", w,
            {"instruction": lambda: w.text(" " + instruction.strip()), "state": lambda: w.state(initial_state)},
        )
        ex = w.example("goal")
        ex.state_targets[-1], ex.state_reference[-1], ex.state_mask[-1] = final_state, initial_state, True
        return ex


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no single token {token!r}; add the placeholder tokens first")
    return int(ids[0])


def collate(examples: list[Example], pad_token_id: int, left_pad: bool = False) -> dict:
    """Pad examples into a batch of tensors (right padding for training, left for
    decoding so every prompt ends at the last column). Position ids count real tokens
    only, so a padded prompt sees the same positions as an unpadded one."""
    import torch

    length = max(len(e) for e in examples)
    batch: dict = {}
    fields = {
        "input_ids": pad_token_id,
        "states": 0.0,
        "actions": 0,
        "state_targets": 0.0,
        "state_reference": 0.0,
        "state_mask": False,
        "action_targets": 0,
        "action_mask": False,
        "done_targets": 0.0,
        "done_mask": False,
        "token_targets": IGNORE_INDEX,
    }
    for name, fill in fields.items():
        rows = []
        for e in examples:
            value = getattr(e, name)
            pad = np.full((length - len(e), *value.shape[1:]), fill, dtype=value.dtype)
            rows.append(np.concatenate([pad, value] if left_pad else [value, pad]))
        batch[name] = torch.from_numpy(np.stack(rows))
    mask = np.zeros((len(examples), length), np.int64)
    for i, e in enumerate(examples):
        if left_pad:
            mask[i, length - len(e) :] = 1
        else:
            mask[i, : len(e)] = 1
    batch["attention_mask"] = torch.from_numpy(mask)
    batch["position_ids"] = torch.from_numpy(np.clip(mask.cumsum(1) - 1, 0, None))
    batch["tasks"] = [e.task for e in examples]
    return batch
