"""Instructions for Meta-World tasks, and the four evaluation levels.

- *training* phrasings: short imperative / request frames around three skill phrases
  per skill; they label the real dataset and teach the grounded LLM.
- *held-out* (``rephrase``) phrasings: hand-written indirect, affective sentences in
  the style of KALM's ``rep-*`` instructions ("I'm unhappy with where the puck is...");
  they share no frame with the training ones (a test checks it).
- novel phrasings (``easy``, ``hard``): hand-written sentences for skills the data
  never shows (a wall in the way, the reverse skills, hammer, soccer, the two
  compositions), four per skill as in KALM's ``en2nl`` table; relocated goals name the
  region, ``then_home`` chains the skill and the way back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from kalm.envs.metaworld.tasks import (
    EASY_SKILLS,
    HARD_SKILLS,
    RELOCATABLE,
    SKILLS,
    TRAINING_SKILLS,
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
    "button-press": ("press the button", "push the button in", "press the button on the box"),
    "door-unlock": ("unlock the door", "turn the lock open", "undo the lock on the door"),
    "door-open": ("open the door", "pull the door open", "swing the door open"),
    "window-open": ("open the window", "slide the window open", "push the window open"),
    "faucet-open": ("turn the faucet on", "open the faucet", "rotate the faucet handle to open it"),
    "coffee-push": ("push the mug under the coffee machine", "slide the cup beneath the coffee machine",
                    "move the mug to the coffee machine"),
    "coffee-button": ("press the button on the coffee machine", "push the coffee machine's button",
                      "press the coffee button"),
    # Not trained on: the easy and hard skills and the other MT10 skills (task files).
    "reach-wall": ("reach the goal position behind the wall", "move the gripper over the wall to the target",
                   "bring the hand around the wall to the marked spot"),
    "push-wall": ("push the puck around the wall to the goal", "slide the puck past the wall to the target",
                  "push the block around the wall onto the marked spot"),
    "pick-place-wall": ("pick up the puck and place it at the goal over the wall",
                        "lift the block over the wall and put it on the target",
                        "pick the puck up and carry it past the wall to the marked spot"),
    "button-press-wall": ("press the button behind the wall", "push the button in past the wall",
                          "reach over the wall and press the button"),
    "door-lock": ("lock the door", "turn the lock shut", "lock the door with its lock"),
    "door-close": ("close the door", "push the door shut", "swing the door closed"),
    "window-close": ("close the window", "slide the window shut", "shut the window"),
    "faucet-close": ("turn the faucet off", "close the faucet", "rotate the faucet handle to close it"),
    "hammer": ("hammer the nail in", "drive the nail in with the hammer", "use the hammer on the nail"),
    "soccer": ("kick the ball into the goal net", "push the soccer ball into the net", "score with the ball"),
    "make-coffee": ("make coffee", "put the mug under the coffee machine and press its button",
                    "brew a cup of coffee"),
    "locked-door-open": ("unlock the door and open it", "open the locked door", "unlock and then open the door"),
    "drawer-open": ("open the drawer", "pull the drawer open", "pull out the drawer"),
    "drawer-close": ("close the drawer", "push the drawer shut", "shut the drawer"),
    "button-press-topdown": ("press the button from the top", "push the button down", "press down on the button"),
    "peg-insert-side": ("insert the peg into the hole", "put the peg in the hole from the side",
                        "slide the peg into the side hole"),
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
    "button-press": (
        "There's a button on that box begging to be pushed in; would you oblige?",
        "I'd like the button on the front of the box depressed, if you don't mind.",
        "Something happens when that button goes in, and I'd like it to happen.",
        "Could you lean on the button until it sinks into its housing?",
    ),
    "door-unlock": (
        "The door is locked and I've lost the key; could you flip the latch for me?",
        "I can't get in while that lock is engaged, would you release it?",
        "It would help if the door's lock were no longer holding it shut.",
        "Would you mind turning the latch so the door is free to move?",
    ),
    "door-open": (
        "It's stuffy in here; could you swing that door wide for me?",
        "The door being shut annoys me, would you mind pulling it towards you?",
        "I'd appreciate it if the door were no longer closed.",
        "Get that door out of the way by swinging it on its hinge, please.",
    ),
    "window-open": (
        "It's getting warm, so I'd like some fresh air through that window.",
        "Could the window pane be slid aside so the window is no longer shut?",
        "Would you mind letting some air in by moving the window open?",
        "I'd appreciate it if that window weren't closed anymore.",
    ),
    "faucet-open": (
        "I'm thirsty; could you get some water running from that faucet?",
        "The faucet is off and I need to wash my hands, would you help?",
        "It would be great if water were flowing from the faucet now.",
        "Would you mind twisting the faucet handle so the water comes on?",
    ),
    "coffee-push": (
        "My mug is nowhere near the coffee machine; could you nudge it into place under the spout?",
        "I'd like the cup sitting right beneath the coffee machine, if you would.",
        "The mug should be waiting under the machine's spout, please get it there.",
        "Would you mind shoving the cup along the table until the coffee machine is above it?",
    ),
    "coffee-button": (
        "I'm desperate for a coffee; would you hit the switch on the machine?",
        "The coffee machine won't start by itself, could you push its button?",
        "It would be lovely if someone pressed the coffee machine's button now.",
        "Would you mind poking the button on the front of the coffee machine?",
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
        "Something happens when the button goes down from above; make it go down, please.",
    ),
    "peg-insert-side": (
        "That peg belongs inside the box's opening; would you fit it in from the side?",
        "I'd like the peg slotted sideways into the hole in the box.",
        "The peg lying on the table should end up plugged into the box, please.",
        "Could you thread the peg through the side opening of the box?",
    ),
    "window-close": (
        "There's a draft coming in; would you take care of the window?",
        "I'm cold, could the open window be slid back so it's shut?",
        "It would be nice if the window were no longer open.",
        "Would you mind sealing up the window by sliding it across?",
    ),
}

# The unseen skills' instructions, four each, in the spirit of KALM's (never trained on).
NOVEL_PHRASES: dict[str, tuple[str, ...]] = {
    "reach-wall": (
        "Move the gripper to the target, keeping in mind the wall standing in the way.",
        "There's a wall between the hand and the goal; reach the goal anyway.",
        "Get the gripper to the marked point without bumping into the wall.",
        "Reach the target position on the far side of the wall.",
    ),
    "push-wall": (
        "Push the puck to the goal, steering it around the wall.",
        "Slide the puck to the target although a wall blocks the straight path.",
        "The wall is in the way; push the puck past it onto the marked spot.",
        "Nudge the puck along the table to the goal, going around the wall.",
    ),
    "pick-place-wall": (
        "Pick up the puck and place it at the goal, lifting it over the wall.",
        "Carry the puck over the wall and put it down at the target.",
        "A wall separates the puck from its goal; lift it across and set it there.",
        "Grab the puck, raise it above the wall and place it on the marked spot.",
    ),
    "button-press-wall": (
        "Press the button, reaching past the wall in front of it.",
        "There's a wall before the button; push the button in anyway.",
        "Get around the wall and press the button on the box.",
        "Push in the button that hides behind the wall.",
    ),
    "door-lock": (
        "Lock the door by turning its lock down.",
        "Engage the lock so the door stays locked.",
        "The door should be locked; turn the lock to lock it.",
        "Please lock the door with its latch.",
    ),
    "door-close": (
        "Close the door by pushing it on its hinge.",
        "Shut the door, please.",
        "Swing the door closed again.",
        "Please push the door until it is closed.",
    ),
    "window-close": (
        "Close the window by sliding it across.",
        "Slide the window until it is shut.",
        "Please shut the window.",
        "Slide the window pane back until the window is closed.",
    ),
    "faucet-close": (
        "Turn the faucet off by rotating its handle.",
        "The faucet is running; close it.",
        "Please twist the faucet handle to turn the water off.",
        "Shut off the faucet.",
    ),
    "hammer": (
        "Pick up the hammer and drive the nail into the wall.",
        "Use the hammer to knock the nail in.",
        "Hit the nail with the hammer until it goes in.",
        "Grab the hammer and hammer the nail home.",
    ),
    "soccer": (
        "Kick the soccer ball into the goal net.",
        "Score a goal: get the ball into the net.",
        "Push the ball along the ground until it is in the net.",
        "Put the soccer ball in the net.",
    ),
    "make-coffee": (
        "Make a coffee: push the mug under the coffee machine, then press its button.",
        "Put the cup beneath the coffee machine and switch it on with the button.",
        "I'd like coffee: slide the mug under the machine and press the coffee button.",
        "Move the mug under the coffee machine, then push the machine's button.",
    ),
    "locked-door-open": (
        "Would you kindly unlock and open the door using the gripper?",
        "The door is locked: unlock it, then pull it open.",
        "Turn the lock open first, then swing the door open.",
        "Unlock the door and then open it.",
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


def novel_skill_phrasings(task: Skill) -> list[str]:
    return list(NOVEL_PHRASES[task.name])


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
    return _level([(t, novel_skill_phrasings(t)) for t in easy_tasks()])


def hard_level(seed: int = 0) -> list[Instruction]:
    return _level([(t, novel_skill_phrasings(t)) for t in hard_tasks()])


LEVELS = {"seen": seen_level, "rephrase": rephrase_level, "easy": easy_level, "hard": hard_level}


# ---------------------------------------------------------------- reading text back
_THEN_HOME_RE = re.compile(r"\b(then|afterwards)\b.*\b(back|home|start(ed|ing)?|return)\b")


_WALLED = {"reach": "reach-wall", "push": "push-wall", "pick-place": "pick-place-wall",
           "button-press": "button-press-wall"}


def _skill_of_text(text: str) -> str | None:
    """The one skill a clause names, by its objects and verbs; ``None`` if unclear."""
    has = lambda pattern: re.search(pattern, text) is not None  # noqa: E731
    opening, closing = has(r"\b(open|pull(ed|s)? out)"), has(r"\b(close|shut)")
    found = set()
    unlocking = has(r"\bunlock|\block\b[^.;]*\bopen\b|\bundo the lock")
    if has(r"\bdoor\b") and (unlocking or has(r"\blocked door")) and has(
            r"\bopen (it|the (locked )?door)\b|\b(pull|swing)\w* (it|the door) open"):
        found.add("locked-door-open")
    elif unlocking:
        found.add("door-unlock")
    elif has(r"\b(lock|latch)"):
        found.add("door-lock")
    elif has(r"\bdoor\b"):
        if opening == closing:
            return None
        found.add("door-open" if opening else "door-close")
    for thing, (opened, closed) in {"window": ("window-open", "window-close"),
                                    "drawer": ("drawer-open", "drawer-close")}.items():
        if has(rf"\b{thing}"):
            if opening == closing:
                return None
            found.add(opened if opening else closed)
    if has(r"\b(faucet|tap)\b"):
        on, off = has(r"\b(turn|twist)\w* (the faucet |it )?on\b|\bopen"), has(r"\boff\b|\bclose|\bshut")
        if on == off:
            return None
        found.add("faucet-open" if on else "faucet-close")
    mug, coffee_button = has(r"\b(mug|cup)\b"), has(r"\bcoffee\b") and has(r"\bbutton\b")
    if has(r"\b(make|brew)\w* (a )?(cup of )?coffee\b|\bi'd like coffee") or (mug and has(r"\bbutton\b")):
        found.add("make-coffee")
    elif mug:
        found.add("coffee-push")
    elif coffee_button:
        found.add("coffee-button")
    elif has(r"\bbutton\b"):
        found.add("button-press-topdown" if has(r"\b(top|above|overhead|down)\b") else "button-press")
    if has(r"\b(hammer|nail)\b"):
        found.add("hammer")
    if has(r"\b(soccer|ball)\b"):
        found.add("soccer")
    if has(r"\bpeg\b"):
        found.add("peg-insert-side")
    if has(r"\b(puck|block|disc)\b"):
        if has(r"\b(pick|lift|carry|grab)"):
            found.add("pick-place")
        elif has(r"\b(push|slide|shove|nudge)"):
            found.add("push")
        else:
            return None
    if not found and has(r"\b(reach|gripper|hand)\b"):
        found.add("reach")
    if len(found) != 1:
        return None
    skill = found.pop()
    return _WALLED.get(skill, skill) if has(r"\bwall\b") else skill


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


assert set(SKILL_PHRASES) == set(SKILLS) and set(TRAINING_SKILLS) <= set(REPHRASES)
assert set(NOVEL_PHRASES) == set(EASY_SKILLS) | set(HARD_SKILLS)
