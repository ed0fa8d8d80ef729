"""Instructions for CLEVR-Robot tasks, and the four evaluation levels.

Two disjoint phrasing families:
- *training* phrasings of relation goals: short imperative, question and statement
  frames with several relation phrasings each (after the original KALM templates);
  these label the real dataset and teach the grounded LLM.
- *held-out* phrasings: longer, indirect, conversational frames, other nouns for the
  balls ("sphere", "orb") and anchor-first wordings. They never label training data;
  the ``rephrase`` level measures whether a policy generalises to them.

The novel task kinds (push, all_of, line, circle) get their own phrasings; they are
never in the real data at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from kalm.envs.clevr.tasks import (
    COLOURS,
    AllOf,
    Circle,
    Line,
    Push,
    Relation,
    hard_tasks,
    push_tasks,
    relation_goals,
)
from kalm.envs.spec import Instruction, Task

# ---------------------------------------------------------------- training phrasings
TRAINING_FRAMES: tuple[str, ...] = (
    "Push the {obj} ball {rel} the {anc} ball",
    "Can you push the {obj} ball {rel} the {anc} ball",
    "Can you help me push the {obj} ball {rel} the {anc} ball",
    "Is the {obj} ball {rel} the {anc} ball",
    "Is there any {obj} ball {rel} the {anc} ball",
    "The {obj} ball moves {rel} the {anc} ball",
    "The {obj} ball is being pushed {rel} the {anc} ball",
    "The {obj} ball is pushed {rel} the {anc} ball",
    "The {obj} ball was moved {rel} the {anc} ball",
    "Move the {obj} ball {rel} the {anc} ball",
    "Keep the {obj} ball {rel} the {anc} ball",
    "Can you move the {obj} ball {rel} the {anc} ball",
    "Can you keep the {obj} ball {rel} the {anc} ball",
    "Can you help me move the {obj} ball {rel} the {anc} ball",
    "Can you help me keep the {obj} ball {rel} the {anc} ball",
    "The {obj} ball was pushed {rel} the {anc} ball",
    "The {obj} ball is being moved {rel} the {anc} ball",
    "The {obj} ball is moved {rel} the {anc} ball",
    "Put the {obj} ball {rel} the {anc} ball",
    "Place the {obj} ball {rel} the {anc} ball",
)
TRAINING_RELATIONS: dict[str, tuple[str, ...]] = {
    "behind": ("behind", "to the behind of", "in behind of"),
    "left": ("to the left of", "left", "in left of"),
    "front": ("in front of", "front", "to the front of"),
    "right": ("to the right of", "right", "in right of"),
}
# Validation templates for grounding: a slice of training frames held back from the
# LLM's training so its explanation accuracy is measured on unseen wordings.
VALIDATION_FRAMES: tuple[str, ...] = TRAINING_FRAMES[-3:]



def grounding_phrasings(task: Task) -> tuple[list[str], list[str]]:
    """``(training, validation)`` phrasings for LLM grounding: the training frames
    minus :data:`VALIDATION_FRAMES`, and those frames."""
    if not isinstance(task, Relation):
        raise ValueError(f"grounding phrasings exist only for relation goals, not {task.kind!r}")
    kept = tuple(f for f in TRAINING_FRAMES if f not in VALIDATION_FRAMES)
    return training_phrasings(task, kept), training_phrasings(task, VALIDATION_FRAMES)


# ---------------------------------------------------------------- held-out phrasings
REPHRASE_FRAMES: tuple[str, ...] = (
    "I'd like the {obj} ball sitting {rel} the {anc} one, please.",
    "Could you arrange things so that the {obj} sphere ends up {rel} the {anc} sphere?",
    "It would make me happy to see the {obj} ball resting {rel} the {anc} ball.",
    "Please nudge the {obj} orb around until it lies {rel} the {anc} orb.",
    "My goal is simple: the {obj} ball should end up {rel} the {anc} ball. Can you make that happen?",
    "Would you mind getting the {obj} sphere over {rel} the {anc} sphere?",
    "Make sure the {anc} ball has the {obj} ball {side}.",
    "Go ahead and bring the {obj} one {rel} the {anc} one, whatever it takes.",
    "The {anc} ball looks lonely; get the {obj} ball {rel} it.",
    "I need the {obj} orb positioned {rel} the {anc} orb before we finish.",
)
REPHRASE_RELATIONS: dict[str, tuple[str, ...]] = {
    "behind": ("at the back of", "just beyond", "behind"),
    "left": ("on the left-hand side of", "to the left of", "leftward of"),
    "front": ("ahead of", "in front of", "before"),
    "right": ("on the right-hand side of", "to the right of", "rightward of"),
}
REPHRASE_SIDES: dict[str, str] = {
    "behind": "right behind it",
    "left": "on its left side",
    "front": "right in front of it",
    "right": "on its right side",
}

# ---------------------------------------------------------------- novel task phrasings
PUSH_FRAMES: tuple[str, ...] = (
    "Push the {obj} ball {way}",
    "Give the {obj} ball a push {way}",
    "Nudge the {obj} ball {way}",
    "Move the {obj} ball a little {way}",
    "Shove the {obj} ball {way}",
)
PUSH_WAYS: dict[str, tuple[str, ...]] = {
    "behind": ("backward", "toward the back"),
    "left": ("to the left", "leftward"),
    "front": ("forward", "toward the front"),
    "right": ("to the right", "rightward"),
}
ALL_OF_FRAMES: tuple[str, ...] = (
    "Arrange the balls so that {clauses}",
    "Make sure that {clauses}",
    "Set up the table: {clauses}",
)
LINE_PHRASES: tuple[str, ...] = (
    "Arrange the balls in a line from left to right: red, blue, green, purple, cyan",
    "Line up all five balls left to right in the order red, blue, green, purple, cyan",
    "Put the balls in a row, going red, blue, green, purple and cyan from left to right",
)
CIRCLE_FRAMES: tuple[str, ...] = (
    "Gather the other balls around the {c} ball",
    "Use the {c} ball as the centre of a circle and arrange the rest around it",
    "Circle around the {c} ball with all the other balls",
)

_WORD_RELATIONS = {"behind": "behind", "left": "left of", "front": "in front of", "right": "right of"}


def _relation_text(task: Relation, frame: str, rel: str) -> str:
    return frame.format(obj=task.object, anc=task.anchor, rel=rel, side=REPHRASE_SIDES[task.direction])


def training_phrasings(task: Relation, frames: Sequence[str] = TRAINING_FRAMES) -> list[str]:
    """Every training phrasing of a relation goal (frames x relation phrasings)."""
    return [_relation_text(task, f, rel) for f in frames for rel in TRAINING_RELATIONS[task.direction]]


def rephrasings(task: Relation) -> list[str]:
    """Every held-out phrasing of a relation goal."""
    return [_relation_text(task, f, rel) for f in REPHRASE_FRAMES for rel in REPHRASE_RELATIONS[task.direction]]


def _clause(task: Relation) -> str:
    return f"the {task.object} ball is {_WORD_RELATIONS[task.direction]} the {task.anchor} ball"


def novel_phrasings(task: Task) -> list[str]:
    """Phrasings of the novel (unseen easy / hard) task kinds."""
    if isinstance(task, Push):
        return [f.format(obj=task.object, way=w) for f in PUSH_FRAMES for w in PUSH_WAYS[task.direction]]
    if isinstance(task, AllOf):
        clauses = [_clause(t) for t in task.tasks if isinstance(t, Relation)]
        joined = ", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else clauses[0]
        return [f.format(clauses=joined) for f in ALL_OF_FRAMES]
    if isinstance(task, Line):
        return list(LINE_PHRASES)
    if isinstance(task, Circle):
        return [f.format(c=task.center) for f in CIRCLE_FRAMES]
    raise ValueError(f"no novel phrasings for task kind {task.kind!r}")


def training_instruction(task: Task, rng: np.random.Generator) -> str:
    """A random training phrasing of a task (relation goals only: the real data)."""
    if not isinstance(task, Relation):
        raise ValueError(f"training phrasings exist only for relation goals, not {task.kind!r}")
    options = training_phrasings(task)
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------- levels
def _level(pairs: list[tuple[Task, list[str]]]) -> list[Instruction]:
    return [Instruction(text, task) for task, texts in pairs for text in texts]


def seen_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, training_phrasings(t)) for t in relation_goals()])


def rephrase_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, rephrasings(t)) for t in relation_goals()])


def easy_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, novel_phrasings(t)) for t in push_tasks()])


def hard_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, novel_phrasings(t)) for t in hard_tasks()])


LEVELS = {"seen": seen_level, "rephrase": rephrase_level, "easy": easy_level, "hard": hard_level}


# ---------------------------------------------------------------- reading text back
_DIRECTION_WORDS = (
    ("left", "left"),
    ("right", "right"),
    ("behind", "behind"),
    ("back", "behind"),
    ("beyond", "behind"),
    ("front", "front"),
    ("ahead", "front"),
    ("forward", "front"),
    ("before", "front"),
)
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def parse_instruction(text: str) -> Task | None:
    """Read an instruction back into a relation or push task, or ``None`` if it names
    neither clearly. Used to score generated explanations: the first colour mentioned
    is the object, the second the anchor, and the direction word decides the side."""
    lowered = text.lower()
    colours = _COLOUR_RE.findall(lowered)
    directions = {d for word, d in _DIRECTION_WORDS if re.search(rf"\b{word}", lowered)}
    if len(directions) != 1:
        return None
    (direction,) = directions
    if len(colours) == 2 and colours[0] != colours[1]:
        return Relation(colours[0], colours[1], direction)
    if len(colours) == 1 and re.search(r"\b(push|nudge|shove|move)\b", lowered):
        return Push(colours[0], direction)
    return None

