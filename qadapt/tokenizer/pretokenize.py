"""Split text into words before BPE, as llama.cpp does (its ``unicode_regex_split``).

Each pre-tokenizer is a list of regexes (``qadapt/data/pretokenizers.json``), applied one after
another: every regex splits each piece the earlier ones left into its matches and the text between
them. llama.cpp runs most regexes with C++'s ``std::regex`` (ECMAScript, the "C" locale) over a
*collapsed* copy of the text, where every code point >= 128 becomes one byte standing for its
Unicode category (letter, number, punctuation, mark, symbol, whitespace or other) and ``\\p{L}``-style
classes become sets of those bytes plus their ASCII members. This module does the same with
Python's ``re`` in ASCII mode, which has the same semantics for these expressions; the categories
come from ``unicodedata`` (Unicode's general category, as llama.cpp's generated tables do), and
whitespace is Unicode's White_Space list. A few regexes are hand-written code in llama.cpp
(``custom`` in the table): the GPT-2 regex (run here with its final ``|\\s+`` alternative, which
that code implements) and a digit splitter (``digit_groups``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable

from ..errors import UnsupportedError

#: Unicode's White_Space property (PropList.txt): what llama.cpp's ``\s`` matches beyond ASCII
WHITESPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                        0x202F, 0x205F, 0x3000])
#: the stand-in of each category in collapsed text, and the ASCII members of its class
_CATEGORY = {"N": ("\xd1", "0-9"), "L": ("\xd2", "A-Za-z"), "P": ("\xd3", r"!-#%-*,-/:-;?-@\[-\]_\{\}"),
             "M": ("\xd4", ""), "S": ("\xd5", r"\$\+<->\^`\|~")}
_OTHER = "\xd0"  # control, format, unassigned, separators that are not white space
_CLASS = re.compile(r"\\p\{(N|L|P|M|S|Lu|Ll|Lt|Lm|Lo)\}")
_NON_ASCII_WS = {c: "\x0b" for c in WHITESPACE if c >= 128}


class _Collapse(dict):
    """``str.translate`` table: a code point >= 128 -> its category's stand-in (computed once per code point)."""

    def __missing__(self, cp: int) -> str:
        if cp < 128:
            raise LookupError  # translate keeps the character
        if cp in WHITESPACE:
            out = "\x0b"  # llama.cpp: non-ASCII white space collapses to a vertical tab
        else:
            out = _CATEGORY.get(unicodedata.category(chr(cp))[0], (_OTHER,))[0]
        self[cp] = out
        return out


_COLLAPSE = _Collapse()


def category(ch: str) -> str:
    """llama.cpp's category letter of one character: N, L, P, M, S, W (white space) or O (other)."""
    cp = ord(ch)
    if cp in WHITESPACE:
        return "W"
    c = unicodedata.category(ch)[0]
    return c if c in _CATEGORY else "O"


def _translate(expr: str, collapsed: bool) -> str:
    """An ECMAScript expression as the Python one with the same matches on (collapsed) text."""
    out, inside, i = [], False, 0
    while i < len(expr):
        ch = expr[i]
        if ch == "\\":
            m = _CLASS.match(expr, i) if collapsed else None
            if m:
                stand_in, ascii_members = _CATEGORY[m.group(1)[0]]
                body = re.escape(stand_in) + ascii_members
                out.append(body if inside else f"[{body}]")
                i = m.end()
                continue
            out.append(expr[i:i + 2])
            i += 2
            continue
        if ch == "[" and not inside:
            inside = True
        elif ch == "]" and inside:
            inside = False
        elif not inside and ch == "$":
            ch = r"\Z"  # ECMAScript's `$` is the end of the input only (Python's also matches before a final \n)
        elif not inside and ch == ".":
            ch = r"[^\n\r\u2028\u2029]"  # ECMAScript's `.` excludes every line terminator
        out.append(ch)
        i += 1
    return "".join(out)


Span = tuple[int, int]


def _regex_splitter(expr: str) -> Callable[[str, str, list[Span]], list[Span]]:
    collapsed = _CLASS.search(expr) is not None
    rx = re.compile(_translate(expr, collapsed), re.ASCII)

    def split(text: str, folded: str, spans: list[Span]) -> list[Span]:
        subject = folded if collapsed else text
        out: list[Span] = []
        for a, b in spans:  # each piece is searched as a whole string of its own, as llama.cpp does
            prev = 0
            for m in rx.finditer(subject[a:b]):
                s, e = m.span()
                if s > prev:
                    out.append((a + prev, a + s))
                if e > s:
                    out.append((a + s, a + e))
                prev = max(prev, e)
            if a + prev < b:
                out.append((a + prev, b))
        return out

    return split


def _digit_groups(text: str, folded: str, spans: list[Span]) -> list[Span]:
    """llama.cpp's hand-written digit splitter: a run of n digits becomes n % 3 digits then groups of three,
    and the text before a run joins the run's first group (as that code does)."""
    out: list[Span] = []
    for a, b in spans:
        prev = pos = a
        while pos < b:
            if folded[pos] in "0123456789\xd1":
                start = pos
                while pos < b and folded[pos] in "0123456789\xd1":
                    pos += 1
                cut = start + (pos - start) % 3
                for end in ([cut] if cut > start else []) + list(range(cut + 3, pos + 1, 3)):
                    if end > prev:
                        out.append((prev, end))
                        prev = end
                continue
            pos += 1
        if prev < b:
            out.append((prev, b))
    return out


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer: ``split(text)`` gives the words BPE runs on."""

    name: str
    type: str
    steps: tuple[Callable[[str, str, list[Span]], list[Span]], ...]
    byte_encode: bool = True
    clean_spaces: bool = True
    ignore_merges: bool = False
    add_bos: bool = False
    no_bos: bool = False
    escape_whitespaces: bool = False

    def split(self, text: str) -> list[str]:
        folded = text.translate(_COLLAPSE).translate(_NON_ASCII_WS)
        spans = [(0, len(text))] if text else []
        for step in self.steps:
            spans = step(text, folded, spans)
        return [text[a:b] for a, b in spans]


@lru_cache(maxsize=None)
def _table() -> dict:
    return json.loads(resources.files("qadapt").joinpath("data/pretokenizers.json").read_text("utf-8"))


def known_names() -> list[str]:
    return sorted(_table()["names"])


@lru_cache(maxsize=None)
def pre_tokenizer(name: str | None, where: str = "") -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre`` = ``name`` (None: absent, llama.cpp's default)."""
    table = _table()
    key = "default" if name in (None, "") else name
    if key in table["unsupported"]:
        raise UnsupportedError(f"{where}: pre-tokenizer `{key}` is not supported: {table['unsupported'][key]}")
    entry = table["names"].get(key)
    if entry is None:
        raise UnsupportedError(f"{where}: unknown pre-tokenizer `tokenizer.ggml.pre` = `{key}` (llama.cpp refuses it "
                               f"too); known: {', '.join(known_names())}")
    kind = table["types"][entry["type"]]
    steps = []
    for expr in kind["regex"]:
        custom = table["custom"].get(expr)
        if custom == "digit_groups":
            steps.append(_digit_groups)
        else:
            steps.append(_regex_splitter(expr + r"|\s+" if custom == "gpt2" else expr))
    flags = {k: v for k, v in entry.items() if k != "type"}
    return PreTokenizer(key, entry["type"], tuple(steps), byte_encode=kind.get("byte_encode", True), **flags)
