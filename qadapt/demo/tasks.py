"""The demo's tasks and corpus: generated from a seed, no downloads.

Every demo prompt has the form ``"<input> =>"`` and its answer follows after one
space. Four skills, each with its own kind of input, so that an X-LoRA classifier
can tell them apart from the prompt alone:

- ``upper``: a sentence, answered in upper case (``the cat sees a dog => THE CAT SEES A DOG``)
- ``reverse``: a comma list, answered backwards (``cat, dog, owl => owl, dog, cat``)
- ``sum``: two two-digit numbers, answered with their sum (``12 + 34 => 46``)
- ``words``: digits, answered as words (``4 7 2 => four seven two``)

The base model is pre-trained to *echo* the input after ``=>`` (``cat, dog => cat, dog``),
and on plain text in which the underlying facts appear in other phrasings (``12 + 34 = 46``,
``... in caps is ...``). Each adapter teaches one task behind ``=>``; without one the base echoes.

Held-out prompts (``held_out``) are drawn with another seed and are never used in training:
:func:`task_examples` drops every input that :func:`held_out` can return for the seeds the
demo uses (``EVAL_SEED``), checked by the input's own hash, so the split does not depend on
drawing order.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

SKILLS = ("upper", "reverse", "sum", "words")
ARROW = " =>"
EVAL_SEED = 1234  # seed of the held-out prompts (tests, MANIFEST scores)
HOLDOUT_PERCENT = 10  # inputs whose hash falls in this bucket are never trained on

NOUNS = ("cat", "dog", "bird", "fish", "cow", "fox", "owl", "bee", "frog", "duck", "king", "queen",
         "boy", "girl", "horse", "sheep", "lion", "bear", "mouse", "goat", "tree", "ship", "star", "moon")
VERBS = ("sees", "likes", "finds", "helps", "wants", "hears", "calls", "feeds", "meets", "follows",
         "paints", "loves")
ADJS = ("red", "big", "small", "old", "new", "happy", "green", "blue", "quiet", "brave", "tall", "warm")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Example:
    skill: str
    input: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.input + ARROW

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(("the", "a")), *([rng.choice(ADJS)] if rng.random() < 0.6 else []), rng.choice(NOUNS),
             rng.choice(VERBS), rng.choice(("the", "a")), *([rng.choice(ADJS)] if rng.random() < 0.4 else []),
             rng.choice(NOUNS)]
    return " ".join(words)


def _noun_list(rng: random.Random) -> str:
    return ", ".join(rng.sample(NOUNS, rng.randint(3, 5)))


def _sum_input(rng: random.Random) -> str:
    return f"{rng.randint(10, 99)} + {rng.randint(10, 99)}"


def _digits(rng: random.Random) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))


INPUTS: dict[str, Callable[[random.Random], str]] = {
    "upper": _sentence, "reverse": _noun_list, "sum": _sum_input, "words": _digits,
}


def solve(skill: str, text: str) -> str:
    """The reference answer for ``skill`` on ``text`` (plain Python, independent of any model)."""
    if skill == "upper":
        return text.upper()
    if skill == "reverse":
        return ", ".join(reversed(text.split(", ")))
    if skill == "sum":
        a, b = text.split(" + ")
        return str(int(a) + int(b))
    if skill == "words":
        return " ".join(DIGIT_WORDS[int(d)] for d in text.split())
    raise ValueError(f"unknown skill {skill!r}; skills: {', '.join(SKILLS)}")


def is_held_out(text: str) -> bool:
    """Whether an input belongs to the held-out bucket (never trained on)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100 < HOLDOUT_PERCENT


def _draw(skill: str, rng: random.Random, held_out: bool) -> Example:
    while True:
        text = INPUTS[skill](rng)
        if is_held_out(text) == held_out:
            return Example(skill, text, solve(skill, text))


def task_examples(skill: str, n: int, seed: int) -> list[Example]:
    """``n`` training examples of ``skill`` (inputs outside the held-out bucket)."""
    rng = random.Random(f"{skill}/{seed}")
    return [_draw(skill, rng, held_out=False) for _ in range(n)]


def held_out(skill: str, n: int, seed: int = EVAL_SEED) -> list[Example]:
    """``n`` distinct held-out examples of ``skill``: inputs no training set contains."""
    rng = random.Random(f"held-out/{skill}/{seed}")
    out: dict[str, Example] = {}
    while len(out) < n:
        e = _draw(skill, rng, held_out=True)
        out.setdefault(e.input, e)
    return list(out.values())


def base_corpus(n: int, seed: int) -> list[str]:
    """Pre-training lines for the base: plain text, facts in other phrasings, and echoes after ``=>``."""
    rng = random.Random(f"base/{seed}")
    lines = []
    for _ in range(n):
        skill = rng.choice(SKILLS)
        e = _draw(skill, rng, held_out=False)
        kind = rng.random()
        if kind < 0.45:  # the echo: what the base does after "=>"
            lines.append(f"{e.prompt} {e.input}")
        elif kind < 0.9:  # the fact, phrased without "=>"
            lines.append(FACT[skill].format(x=e.input, y=e.answer))
        else:
            lines.append(e.answer)
    return lines


FACT = {
    "upper": "{x} in caps is {y}",
    "reverse": "{x} backwards is {y}",
    "sum": "{x} = {y}",
    "words": "{x} reads {y}",
}
