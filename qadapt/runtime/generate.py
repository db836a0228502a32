"""Prefill, decode, sampling and streaming for one prompt (batched serving builds on the same step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError
from ..tokenizer import StreamDecoder
from .kv_cache import KVCache


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        return self


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) | "length"
    extra: dict[str, Any] = field(default_factory=dict)


def sample_next(logits: torch.Tensor, p: SamplingParams, history: list[int], gen: torch.Generator | None) -> int:
    """One token id from logits [V] (float32)."""
    logits = logits.float().clone()
    if p.repetition_penalty != 1.0 and history:
        idx = torch.tensor(sorted(set(history)))
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


StepFn = Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


class TextStream:
    """One sequence's text as its tokens arrive, and when it ends: the end-of-generation ids, stop strings
    (the text is cut before the first one) and the hold-back of a tail that could still begin one. The one
    place this logic lives: :func:`run_generation` (``Model.generate``) and the server's engine both use it.

    :meth:`push` takes each generated token and returns the text it releases; :attr:`reason` becomes
    ``"eos"`` or ``"stop_sequence"`` when the sequence is over, and :meth:`close` releases what is held
    when it ends otherwise (``"length"``)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], params: SamplingParams):
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.eos = frozenset(tokenizer.eos_ids)
        self.stops = tuple(s for s in params.stop if s)
        self.hold = max((len(s) for s in self.stops), default=0)
        self.text, self.sent = "", 0
        self.tokens: list[int] = []  # generated, the end-of-generation token excluded
        self.reason: str | None = None

    def push(self, tok: int) -> str:
        if tok in self.eos:
            self.reason = "eos"
            return self._release(len(self.text))
        self.tokens.append(tok)
        self.text += self.decoder.push(tok)
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        if hits:
            self.text, self.reason = self.text[:min(hits)], "stop_sequence"
            return self._release(len(self.text))
        return self._release(len(self.text) - self.hold)

    def close(self, reason: str = "length") -> str:
        """The sequence ends here (the length limit): release the held tail."""
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
    cache = new_cache(min(total, context_length))
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    ids = torch.tensor([prompt_ids])
    pos = torch.arange(len(prompt_ids)).unsqueeze(0)
    history = list(prompt_ids)
    for _ in range(params.max_new_tokens):
        if pos[0, -1] >= cache.max_len:
            break
        tok = sample_next(step(ids, pos, cache)[0], params, history, gen)
        history.append(tok)
        yield tok
        ids = torch.tensor([[tok]])
        pos = pos[:, -1:] + 1


def run_generation(step, new_cache, prompt_ids, params, tokenizer, context_length,
                   stream: bool = False) -> Generation | Iterator[str]:
    """:func:`generate_tokens` through a :class:`TextStream`: a :class:`Generation`, or the text pieces."""
    text = TextStream(tokenizer, prompt_ids, params)
    tokens = generate_tokens(step, new_cache, prompt_ids, params, context_length)
    if stream:
        return _pieces(tokens, text)
    for _ in _pieces(tokens, text):
        pass
    return Generation(text.text, text.tokens, len(prompt_ids), "length" if text.reason == "length" else "stop")


def _pieces(tokens: Iterator[int], text: TextStream) -> Iterator[str]:
    for tok in tokens:
        piece = text.push(tok)
        if piece:
            yield piece
        if text.reason is not None:
            return
    tail = text.close()
    if tail:
        yield tail
