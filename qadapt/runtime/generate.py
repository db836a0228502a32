"""Prefill, decode, sampling and streaming for one prompt (batched serving builds on the same step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError
from ..tokenizer import StreamDecoder
from .kv_cache import KVCache
from .sampling import Sampler, SamplingParams, sample_next  # noqa: F401  (sample_next: re-exported)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) | "length"
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # the sampling seed (drawn when none was given), None when greedy


StepFn = Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


class TextStream:
    """One sequence's text as its tokens arrive, and when it ends: the end-of-generation ids, stop strings
    and the hold-back of a tail that could still begin one. The one place this logic lives:
    :func:`run_generation` (``Model.generate``) and the server's engine both use it.

    Stop strings: the text ends before the first one (OpenAI's rule) or, with ``keep_stop``, right after it
    (TGI's and LoRAX's: the stop text stays in ``generated_text``); only the cut needs a hold-back.
    ``ignore_eos``: end-of-generation tokens are ordinary tokens (their text, if any, is kept).

    :meth:`push` takes each generated token and returns the text it releases; :attr:`reason` becomes
    ``"eos"`` or ``"stop_sequence"`` when the sequence is over, and :meth:`close` releases what is held
    when it ends otherwise (``"length"``). :attr:`generated` counts every token pushed, the end-of-generation
    one included (TGI's ``generated_tokens``, OpenAI's ``completion_tokens``); :attr:`tokens` are the ones
    whose text is in :attr:`text`."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams):
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.eos = frozenset() if params.ignore_eos else frozenset(tokenizer.eos_ids)
        self.stops = tuple(s for s in params.stop if s)
        self.keep_stop = params.keep_stop
        longest = max((len(s) for s in self.stops), default=0)
        self.hold = 0 if self.keep_stop else longest
        self._reach = max(0, longest - 1)  # how far back a stop completed by new text can begin
        self.text, self.sent = "", 0
        self.tokens: list[int] = []  # generated, the end-of-generation token excluded
        self.generated = 0
        self.reason: str | None = None

    def push(self, tok: int) -> str:
        self.generated += 1
        if tok in self.eos:
            self.reason = "eos"
            self.text += self.decoder.flush()
            return self._release(len(self.text))
        self.tokens.append(tok)
        before = len(self.text)
        self.text += self.decoder.push(tok)
        if self.stops and len(self.text) > before:
            cut = self._stop_at(max(0, before - self._reach))
            if cut is not None:
                self.text, self.reason = self.text[:cut], "stop_sequence"
                return self._release(cut)
        return self._release(len(self.text) - self.hold)

    def _stop_at(self, start: int) -> int | None:
        """Where the text ends if a stop string occurs at or after ``start`` (the earliest one wins)."""
        best = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(s))
        if best is None:
            return None
        return best[1] if self.keep_stop else best[0]

    def close(self, reason: str = "length") -> str:
        """The sequence ends here (the length limit): release the held tail, a half character included
        (as U+FFFD: the text is then ``decode(tokens)``)."""
        if self.reason is None:
            self.text += self.decoder.flush()
        self.reason = self.reason or reason
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


def generate_tokens(
    step: StepFn,
    new_cache: Callable[[int], KVCache],
    prompt_ids: list[int],
    params: SamplingParams,
    context_length: int,
    sampler: Sampler | None = None,
) -> Iterator[int]:
    """Yield sampled token ids until the limit (the caller stops on EOS or a stop string).

    ``step(ids [1, T], positions [1, T], cache)`` returns the last position's logits [1, V].
    """
    params.validate()
    if not prompt_ids:
        raise InputError("the prompt is empty (no tokens)")
    total = len(prompt_ids) + params.max_new_tokens
    if len(prompt_ids) >= context_length:
        raise InputError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {context_length}")
    sampler = sampler or Sampler(params, prompt_ids)
    cache = new_cache(min(total, context_length))
    ids = torch.tensor([prompt_ids])
    pos = torch.arange(len(prompt_ids)).unsqueeze(0)
    for _ in range(params.max_new_tokens):
        if pos[0, -1] >= cache.max_len:
            break
        tok = sampler.next(step(ids, pos, cache)[0]).token
        yield tok
        if sampler.grammar_done:  # nothing but the end can follow: end here, without another forward
            return
        ids = torch.tensor([[tok]])
        pos = pos[:, -1:] + 1


def run_generation(step, new_cache, prompt_ids, params, tokenizer, context_length,
                   stream: bool = False) -> Generation | Iterator[str]:
    """:func:`generate_tokens` through a :class:`TextStream`: a :class:`Generation`, or the text pieces."""
    text = TextStream(tokenizer, prompt_ids, params)
    sampler = Sampler(params, prompt_ids, tokenizer.eos_ids)
    tokens = generate_tokens(step, new_cache, prompt_ids, params, context_length, sampler)
    if stream:
        return _pieces(tokens, text, sampler)
    for _ in _pieces(tokens, text, sampler):
        pass
    return Generation(text.text, text.tokens, len(prompt_ids), "length" if text.reason == "length" else "stop",
                      seed=sampler.seed)


def _pieces(tokens: Iterator[int], text: TextStream, sampler: Sampler) -> Iterator[str]:
    for tok in tokens:
        piece = text.push(tok)
        if piece:
            yield piece
        if text.reason is not None:
            return
    tail = text.close("eos" if sampler.grammar_done else "length")
    if tail:
        yield tail
