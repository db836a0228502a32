"""Constrained decoding: JSON schemas, regular expressions and Lark grammars, through llguidance.

A :class:`Constraint` says what the output must match; :func:`compile_constraint` turns it into a
:class:`Grammar` for one tokenizer (cached: a schema is compiled once); each sequence gets its own
:class:`Matcher`, which masks the logits before sampling and advances with each chosen token. When the
grammar is complete and nothing but the end can follow, the matcher is :attr:`~Matcher.done` and the
sequence ends there (its end-of-generation token is implied).

Why llguidance: measured per token on this project's 2-core CI machine class with Llama 3's 128k
vocabulary (``tools/bench.py --constrained``), its mask costs a few microseconds to tens of microseconds,
like xgrammar's and outlines-core's, but it compiles a schema in about a millisecond (outlines-core:
tens of ms to seconds for its index), takes any tokenizer from its token bytes (GGUF vocabularies too),
supports JSON schema, regex and Lark in one engine, and never raises on bad input: a schema it cannot
compile is reported with its message, which the server returns as a 400.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError, UnsupportedError

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "lark", "choice")
_ANY_OBJECT = {"type": "object"}
#: JSON without free whitespace between tokens: as valid, and the mask stays cheap (free whitespace lets a
#: model emit runs of blank tokens, each a costly mask over the 100k+ whitespace-bearing tokens)
_COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What the output must match. ``value``: a JSON schema (dict or text) for ``json_schema``, a regular
    expression, a Lark grammar, or a list of strings for ``choice``; nothing for ``json_object``."""

    kind: str
    value: Any = None

    def key(self) -> str:
        return self.kind + "\0" + (self.value if isinstance(self.value, str) else json.dumps(self.value,
                                                                                              sort_keys=True))

    def grammar_text(self) -> str:
        import llguidance

        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, overrides=_COMPACT)
        if self.kind == "json_schema":
            schema = self.value
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise InputError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise InputError(f"a JSON schema must be an object, got {type(schema).__name__}")
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPACT)
            except ValueError as e:
                raise InputError(f"the JSON schema cannot be used: {e}") from None
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        if self.kind == "choice":
            if not self.value or not all(isinstance(c, str) for c in self.value):
                raise InputError("a choice constraint needs a non-empty list of strings")
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.value))
        raise InputError(f"unknown constraint kind `{self.kind}` (one of {', '.join(KINDS)})")


class Grammar:
    """A constraint compiled for one tokenizer; :meth:`matcher` starts a sequence."""

    def __init__(self, lltok: Any, text: str, vocab: int, what: str):
        import llguidance

        self.vocab, self.what = vocab, what
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, lltok)
        if failed:
            raise InputError(f"the {what} cannot be used: {messages[0]}")
        self._template = llguidance.LLMatcher(lltok, text, log_level=0)  # copied per sequence (microseconds)
        if self._template.is_error():
            raise InputError(f"the {what} cannot be used: {self._template.get_error()}")

    def matcher(self) -> "Matcher":
        return Matcher(self, self._template.deep_copy())


class Matcher:
    """One sequence's position in a grammar: masks logits, advances by the chosen token."""

    def __init__(self, grammar: Grammar, m: Any):
        self.g, self.m = grammar, m
        self._bits = np.empty((grammar.vocab + 31) // 32, dtype=np.int32)

    def _check(self) -> None:
        if self.m.is_error():
            raise InputError(f"the {self.g.what} failed: {self.m.get_error()}")

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of every token the grammar forbids here to -inf (in place)."""
        self.m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        n = logits.numel()
        add = np.take(_LUT, self._bits.view(np.uint8), axis=0).reshape(-1)[:n]  # 0 where allowed, -inf not
        if logits.dtype == torch.float32 and logits.is_contiguous():
            logits.numpy()[:] += add
        else:
            logits.add_(torch.from_numpy(add).to(logits.dtype))

    def advance(self, token: int) -> None:
        if not self.m.consume_token(token):
            raise InputError(f"token {token} does not fit the {self.g.what} ({self.m.get_error()})")

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.m.is_stopped()


# ---------------------------------------------------------------------- tokenizers
class _Wrapped:
    """What llguidance's TokenizerWrapper reads: token bytes (control tokens marked with 0xFF, as its
    llama.cpp adapter does), BOS/EOS, and an encoder of plain text."""

    def __init__(self, tok: Any, vocab: int):
        n = min(vocab, tok.vocab_size)
        self.tokens = [(b"\xff" if tok.is_special(i) else b"") + tok.token_bytes(i) for i in range(n)]
        self.tokens += [b""] * (vocab - n)
        self.special_token_ids = [i for i in range(n) if tok.is_special(i)]
        eos = tuple(tok.eos_ids)
        self.eos_token_id = eos[0] if eos else 0
        self.bos_token_id = tok.bos_id
        llama = getattr(tok, "llama", None)
        if llama is not None:  # a GGUF vocabulary: forced text continues the output, no SentencePiece space
            enc = lambda t: llama.encode(t, False, False, space_prefix=False)  # noqa: E731
        else:
            enc = lambda t: tok.encode(t, False, False)  # noqa: E731
        self._encode = functools.lru_cache(maxsize=65536)(lambda b: tuple(enc(b.decode("utf-8", "replace"))))

    def __call__(self, text: str | bytes) -> list[int]:
        """The canonical tokens of text the grammar forces (llguidance asks; memoized, ~25 us a call)."""
        return list(self._encode(text if isinstance(text, bytes) else text.encode("utf-8")))


#: byte -> its 8 bits as additive logit masks (0 allowed, -inf not): llguidance's bitmask applied in ~30 us
_LUT = np.array([[0.0 if (b >> k) & 1 else -np.inf for k in range(8)] for b in range(256)], np.float32)

_LOCK = threading.Lock()
_LLTOK: dict[tuple[int, int], Any] = {}  # (id(tokenizer), vocab) -> (tokenizer, LLTokenizer)
_GRAMMARS: OrderedDict = OrderedDict()
MAX_CACHED = 64


def _lltokenizer(tok: Any, vocab: int) -> Any:
    try:
        import llguidance
    except ImportError:
        raise UnsupportedError("structured output needs llguidance: pip install 'qadapt[serve]' "
                               "(or pip install llguidance)") from None
    with _LOCK:
        hit = _LLTOK.get((id(tok), vocab))
        if hit is not None and hit[0] is tok:
            return hit[1]
    eos = [int(e) for e in tok.eos_ids] or None
    hf = getattr(tok, "hf", None)
    if hf is not None and getattr(hf, "is_fast", False):  # tokenizers' own JSON: llguidance reads it natively
        import llguidance.hf

        built = llguidance.hf.from_tokenizer(hf, n_vocab=max(vocab, len(hf)), eos_token=eos)
    else:
        built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(tok, vocab)), n_vocab=vocab,
                                       eos_token=eos)
    with _LOCK:
        _LLTOK[(id(tok), vocab)] = (tok, built)
    return built


def compile_constraint(tokenizer: Any, constraint: Constraint, vocab: int) -> Grammar:
    """``constraint`` for ``tokenizer`` over a model vocabulary of ``vocab`` logits (cached)."""
    if tokenizer is None or not hasattr(tokenizer, "token_bytes"):
        raise InputError("structured output needs the model's tokenizer")
    key = (id(tokenizer), vocab, constraint.key())
    with _LOCK:
        g = _GRAMMARS.get(key)
        if g is not None:
            _GRAMMARS.move_to_end(key)
            return g
    what = {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
            "lark": "grammar", "choice": "choice list"}.get(constraint.kind, constraint.kind)
    g = Grammar(_lltokenizer(tokenizer, vocab), constraint.grammar_text(), vocab, what)
    with _LOCK:
        _GRAMMARS[key] = g
        while len(_GRAMMARS) > MAX_CACHED:
            _GRAMMARS.popitem(last=False)
    return g
