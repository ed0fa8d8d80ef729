"""Instructions for Meta-World tasks, and the four evaluation levels.

- *training* phrasings: short imperative / request frames around three skill phrases
  per skill; they label the real dataset and teach the grounded LLM.
- *held-out* (``rephrase``) phrasings: hand-written indirect, affective sentences in
  the style of KALM's ``rep-*`` instructions ("I'm unhappy with where the puck is...");
  they share no frame with the training ones (a test checks it).
- novel phrasings: relocated goals (``easy``) name the region, ``then_home`` (``hard``)
  chains the skill and the way back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from kalm.envs.metaworld.tasks import (
    RELOCATABLE,
    SKILLS,
    Relocated,
    Skill,
    ThenHome,
    easy_tasks,
    hard_tasks,
    training_tasks,
)
from kalm.envs.spec import Instruction, Task

# ---------------------------------------------------------------- training phrasings
SKILL_PHRASES: dict[str, tuple[str, ...]] = {
    "reach": ("reach the goal position", "move the gripper to the target", "bring the hand to the marked spot"),
    "push": ("push the puck to the goal", "slide the puck to the target", "push the block onto the marked spot"),
    "pick-place": ("pick up the puck and place it at the goal", "lift the block and put it on the target",
                   "pick the puck up and carry it to the marked spot"),
    "door-open": ("open the door", "pull the door open", "swing the door open"),
    "drawer-open": ("open the drawer", "pull the drawer open", "pull out the drawer"),
    "drawer-close": ("close the drawer", "push the drawer shut", "shut the drawer"),
    "button-press-topdown": ("press the button from the top", "push the button down", "press down on the button"),
    "peg-insert-side": ("insert the peg into the hole", "put the peg in the hole from the side",
                        "slide the peg into the side hole"),
    "window-open": ("open the window", "slide the window open", "push the window open"),
    "window-close": ("close the window", "slide the window shut", "shut the window"),
}
TRAINING_FRAMES: tuple[str, ...] = (
    "{X}",
    "Please {x}",
    "Can you {x}",
    "Robot, {x}",
    "Your task is to {x}",
    "I want you to {x}",
    "Go and {x}",
    "Try to {x}",
)
# Held back from grounding's training so explanation accuracy is measured on unseen frames.
VALIDATION_FRAMES: tuple[str, ...] = TRAINING_FRAMES[-2:]

# ---------------------------------------------------------------- held-out phrasings
REPHRASES: dict[str, tuple[str, ...]] = {
    "reach": (
        "I'm not happy with where the gripper is; could it end up at the highlighted point instead?",
        "It would be lovely if the arm's fingertips were resting at that little red marker.",
        "The gripper belongs over at the designated location, would you see to that?",
        "Would you mind getting the end effector over to the goal marker?",
    ),
    "push": (
        "That puck is in the wrong spot; nudge it along the table until it sits on the marker.",
        "It bothers me that the puck isn't at its destination, could you shove it there?",
        "Would you mind getting the round thing over to the target by sliding it?",
        "The little disc should be resting on the goal, without lifting it, if you would.",
    ),
    "pick-place": (
        "I'd love to see the puck raised off the table and set down at the target.",
        "Grab that disc, carry it through the air and drop it off at the goal, would you?",
        "The puck needs to travel to the marked point; hold it in your fingers on the way.",
        "Could the puck be gripped and relocated to where the marker is?",
    ),
    "door-open": (
        "It's stuffy in here; could you swing that door wide for me?",
        "The door being shut annoys me, would you mind pulling it towards you?",
        "I'd appreciate it if the door were no longer closed.",
        "Get that door out of the way by swinging it on its hinge, please.",
    ),
    "drawer-open": (
        "I need something from the drawer, so could you slide it out towards you?",
        "The drawer is shut and I can't reach inside; would you fix that?",
        "It would help me a lot if the drawer were pulled all the way out.",
        "Would you mind drawing the drawer out by its handle?",
    ),
    "drawer-close": (
        "Someone left the drawer sticking out; would you tidy that up?",
        "I keep bumping into that open drawer, could you slide it back in?",
        "It would be neater if the drawer were pushed all the way home.",
        "Would you mind getting the drawer flush with the cabinet again?",
    ),
    "button-press-topdown": (
        "There is a button waiting to be pushed from above; would you do the honours?",
        "I'd like that button depressed, coming at it from overhead.",
        "Could you lean on the button from the top until it clicks?",
        "Something happens when the button goes down; make it go down, please.",
    ),
    "peg-insert-side": (
        "That peg belongs inside the box's opening; would you fit it in from the side?",
        "I'd like the peg slotted sideways into the hole in the box.",
        "The peg lying on the table should end up plugged into the box, please.",
        "Could you thread the peg through the side opening of the box?",
    ),
    "window-open": (
        "It's getting warm, so I'd like some fresh air through that window.",
        "Could the window pane be slid aside so the window is no longer shut?",
        "Would you mind letting some air in by moving the window open?",
        "I'd appreciate it if that window weren't closed anymore.",
    ),
    "window-close": (
        "There's a draft coming in; would you take care of the window?",
        "I'm cold, could the open window be slid back so it's shut?",
        "It would be nice if the window were no longer open.",
        "Would you mind sealing up the window by sliding it across?",
    ),
}

# ---------------------------------------------------------------- novel phrasings
REGION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left side of the table", "far to the left"),
    "right": ("on the right side of the table", "far to the right"),
    "near": ("close to the robot", "near the robot's base"),
}
RELOCATED_FRAMES: dict[str, tuple[str, ...]] = {
    "reach": ("Reach the goal position {r}", "Move the gripper to the target {r}"),
    "push": ("Push the puck to the goal {r}", "Slide the puck to the target {r}"),
    "pick-place": ("Pick up the puck and place it at the goal {r}", "Lift the block and put it on the target {r}"),
}
THEN_HOME_FRAMES: tuple[str, ...] = (
    "{X}, then return the gripper to where it started",
    "First {x}, and afterwards bring the hand back to its starting position",
    "{X} and then move the arm back home",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def training_phrasings(task: Skill, frames: Sequence[str] = TRAINING_FRAMES) -> list[str]:
    """Every training phrasing of a skill (frames x skill phrases)."""
    return [f.format(X=_cap(p), x=p) for f in frames for p in SKILL_PHRASES[task.name]]


def rephrasings(task: Skill) -> list[str]:
    return list(REPHRASES[task.name])


def novel_phrasings(task: Task) -> list[str]:
    if isinstance(task, Relocated):
        return [f.format(r=r) for f in RELOCATED_FRAMES[task.skill] for r in REGION_WORDS[task.region]]
    if isinstance(task, ThenHome):
        return [f.format(X=_cap(p), x=p) for f in THEN_HOME_FRAMES for p in SKILL_PHRASES[task.skill][:2]]
    raise ValueError(f"no novel phrasings for task kind {task.kind!r}")


def training_instruction(task: Task, rng: np.random.Generator) -> str:
    """A random training phrasing of a skill (skills only: the real data)."""
    if not isinstance(task, Skill):
        raise ValueError(f"training phrasings exist only for skills, not {task.kind!r}")
    options = training_phrasings(task)
    return options[int(rng.integers(len(options)))]


def grounding_phrasings(task: Task) -> tuple[list[str], list[str]]:
    """``(training, validation)`` phrasings for LLM grounding (skills only)."""
    if not isinstance(task, Skill):
        raise ValueError(f"grounding phrasings exist only for skills, not {task.kind!r}")
    kept = tuple(f for f in TRAINING_FRAMES if f not in VALIDATION_FRAMES)
    return training_phrasings(task, kept), training_phrasings(task, VALIDATION_FRAMES)


# ---------------------------------------------------------------- levels
def _level(pairs) -> list[Instruction]:
    return [Instruction(text, task) for task, texts in pairs for text in texts]


def seen_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, training_phrasings(t)) for t in training_tasks()])


def rephrase_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, rephrasings(t)) for t in training_tasks()])


def easy_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, novel_phrasings(t)) for t in easy_tasks()])


def hard_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, novel_phrasings(t)) for t in hard_tasks()])


LEVELS = {"seen": seen_level, "rephrase": rephrase_level, "easy": easy_level, "hard": hard_level}


# ---------------------------------------------------------------- reading text back
_THEN_HOME_RE = re.compile(r"\b(then|afterwards)\b.*\b(back|home|start(ed|ing)?|return)\b")


def _skill_of_text(text: str) -> str | None:
    """The one skill a clause names, by its object and verb; ``None`` if unclear."""
    has = lambda pattern: re.search(pattern, text) is not None  # noqa: E731
    opening, closing = has(r"\b(open|pull(ed|s)? out)"), has(r"\b(close|shut)")
    found = set()
    for thing, (opened, closed) in {"window": ("window-open", "window-close"),
                                    "drawer": ("drawer-open", "drawer-close")}.items():
        if has(rf"\b{thing}"):
            if opening == closing:
                return None
            found.add(opened if opening else closed)
    if has(r"\bdoor\b"):
        if not opening or closing:
            return None
        found.add("door-open")
    if has(r"\bbutton\b"):
        found.add("button-press-topdown")
    if has(r"\bpeg\b"):
        found.add("peg-insert-side")
    if has(r"\b(puck|block)\b"):
        if has(r"\b(pick|lift|carry)"):
            found.add("pick-place")
        elif has(r"\b(push|slide|shove|nudge)"):
            found.add("push")
        else:
            return None
    if not found and has(r"\b(reach|gripper|hand)\b"):
        found.add("reach")
    return found.pop() if len(found) == 1 else None


def parse_instruction(text: str) -> Task | None:
    """Read an instruction back into a task, or ``None`` if it names none clearly: the
    skill from its object and verb, a region word makes it a relocated goal, and "then
    ... back / home" a skill-then-home sequence."""
    lowered = text.lower()
    then_home = _THEN_HOME_RE.search(lowered)
    clause = lowered[: then_home.start()] if then_home else lowered
    skill = _skill_of_text(clause)
    if skill is None:
        return None
    if then_home:
        return ThenHome(skill)
    regions = [name for name, words in REGION_WORDS.items() if any(w in clause for w in words)]
    if len(regions) == 1 and skill in RELOCATABLE:
        return Relocated(skill, regions[0])
    if regions:
        return None
    return Skill(skill)


assert set(SKILL_PHRASES) == set(SKILLS) == set(REPHRASES)
