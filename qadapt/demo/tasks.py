"""The demo's tasks and corpus: generated from a seed, no downloads.

Every demo prompt has the form ``"Q: <input> =>"`` and its answer follows after one
space (the ``Q:`` makes every input word follow a space, so a word is one token
wherever it stands). Each skill has its own kind of input, told apart by its first
word (an adjective, an article, a digit, a bare noun), so that an X-LoRA classifier can route
every token after ``Q:`` to the right adapter:

- ``upper``: two noun phrases joined by "and", the first without an article, answered in upper case
  (``Q: red cat and a dog => RED CAT AND A DOG``)
- ``french``: a sentence, answered word by word in French (``Q: the cat sees a dog => le chat voit un chien``)
- ``words``: digits, answered as words (``Q: 4 7 2 => four seven two``)
- ``reverse``: a comma list, answered backwards (``Q: cat, dog, owl => owl, dog, cat``)

The base model is pre-trained to *echo* the input after ``=>`` (``Q: cat, dog => cat, dog``),
and on plain text in which the word-level facts appear in other phrasings (``cat in caps is
CAT``, ``cat in french is chat``, ``4 reads four``). Each adapter teaches one task behind
``=>``; without one the base echoes.

Held-out prompts (``held_out``) are drawn with another seed and are never used in training:
:func:`task_examples` drops every input that :func:`held_out` can return (the input's own
hash decides), so the split does not depend on drawing order.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

SKILLS = ("upper", "french", "words", "reverse")
ARROW = " =>"
EVAL_SEED = 1234  # seed of the held-out prompts (tests, MANIFEST scores)
HOLDOUT_PERCENT = 10  # inputs whose hash falls in this bucket are never trained on

FRENCH = {  # word -> French, one word each (articles and adjectives uninflected: it is a demo)
    "the": "le", "a": "un", "and": "et",
    "cat": "chat", "dog": "chien", "bird": "oiseau", "fish": "poisson", "cow": "vache", "fox": "renard",
    "owl": "hibou", "bee": "abeille", "frog": "grenouille", "duck": "canard", "king": "roi", "queen": "reine",
    "boy": "garcon", "girl": "fille", "horse": "cheval", "sheep": "mouton", "lion": "lion", "bear": "ours",
    "mouse": "souris", "goat": "chevre", "tree": "arbre", "ship": "bateau", "star": "etoile", "moon": "lune",
    "sees": "voit", "likes": "aime", "finds": "trouve", "helps": "aide", "wants": "veut", "hears": "entend",
    "calls": "appelle", "feeds": "nourrit", "meets": "rencontre", "follows": "suit", "paints": "peint",
    "loves": "adore",
    "red": "rouge", "big": "grand", "small": "petit", "old": "vieux", "new": "neuf", "happy": "heureux",
    "green": "vert", "blue": "bleu", "quiet": "calme", "brave": "brave", "tall": "haut", "warm": "chaud",
}
NOUNS = ("cat", "dog", "bird", "fish", "cow", "fox", "owl", "bee", "frog", "duck", "king", "queen",
         "boy", "girl", "horse", "sheep", "lion", "bear", "mouse", "goat", "tree", "ship", "star", "moon")
VERBS = ("sees", "likes", "finds", "helps", "wants", "hears", "calls", "feeds", "meets", "follows",
         "paints", "loves")
ADJS = ("red", "big", "small", "old", "new", "happy", "green", "blue", "quiet", "brave", "tall", "warm")
PREFIX = "Q: "
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Example:
    skill: str
    input: str
    answer: str

    @property
    def prompt(self) -> str:
        return PREFIX + self.input + ARROW

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(("the", "a")), *([rng.choice(ADJS)] if rng.random() < 0.6 else []), rng.choice(NOUNS),
             rng.choice(VERBS), rng.choice(("the", "a")), *([rng.choice(ADJS)] if rng.random() < 0.4 else []),
             rng.choice(NOUNS)]
    return " ".join(words)


def _noun_phrase(rng: random.Random) -> list[str]:
    return [rng.choice(("the", "a")), *([rng.choice(ADJS)] if rng.random() < 0.5 else []), rng.choice(NOUNS)]


def _pair(rng: random.Random) -> str:
    """Two noun phrases joined by "and"; the first starts with its adjective (no article)."""
    return " ".join([rng.choice(ADJS), rng.choice(NOUNS), "and", *_noun_phrase(rng)])


def _noun_list(rng: random.Random) -> str:
    return ", ".join(rng.sample(NOUNS, rng.randint(3, 5)))


def _digits(rng: random.Random) -> str:
    return " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))


INPUTS: dict[str, Callable[[random.Random], str]] = {
    "upper": _pair, "french": _sentence, "words": _digits, "reverse": _noun_list,
}


def solve(skill: str, text: str) -> str:
    """The reference answer for ``skill`` on ``text`` (plain Python, independent of any model)."""
    if skill == "upper":
        return text.upper()
    if skill == "reverse":
        return ", ".join(reversed(text.split(", ")))
    if skill == "french":
        return " ".join(FRENCH[w] for w in text.split())
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
    """Pre-training lines for the base: echoes after ``=>``, and the word-level facts in other phrasings."""
    rng = random.Random(f"base/{seed}")
    lines = []
    for _ in range(n):
        skill = rng.choice(SKILLS)
        e = _draw(skill, rng, held_out=False)
        kind = rng.random()
        if kind < 0.5:  # the echo: what the base does after "=>"
            lines.append(f"{e.prompt} {e.input}")
        elif kind < 0.8:  # one word-level fact
            lines.append(_word_fact(rng))
        else:  # the plain text of an input
            lines.append(PREFIX + e.input)
    return lines


def _word_fact(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        w = rng.choice(NOUNS + VERBS + ADJS + ("the", "a", "and"))
        return f"{PREFIX}{w} in caps is {w.upper()}"
    if kind == 1:
        w = rng.choice(list(FRENCH))
        return f"{PREFIX}{w} in french is {FRENCH[w]}"
    d = rng.randrange(10)
    return f"{PREFIX}{d} reads {DIGIT_WORDS[d]}"
