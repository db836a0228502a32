"""Prefill, decode, sampling and streaming for one prompt (batched serving builds on the same step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..errors import InputError
from ..tokenizer import StreamDecoder, Tokenizer
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


def generate_tokens(
    step: StepFn,
    new_cache: Callable[[int], KVCache],
    prompt_ids: list[int],
    params: SamplingParams,
    tokenizer: Tokenizer,
    context_length: int,
) -> Iterator[tuple[int, str]]:
    """Yield (token id, text piece) as tokens are generated; stops at EOS, a stop string or the limit.

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
    decoder = StreamDecoder(tokenizer, prompt_ids)
    for n in range(params.max_new_tokens):
        if pos[0, -1] >= cache.max_len:
            break
        logits = step(ids, pos, cache)[0]
        tok = sample_next(logits, params, history, gen)
        history.append(tok)
        if tok in tokenizer.eos_ids:
            yield tok, ""
            return
        yield tok, decoder.push(tok)
        ids = torch.tensor([[tok]])
        pos = pos[:, -1:] + 1


def run_generation(step, new_cache, prompt_ids, params, tokenizer, context_length,
                   stream: bool = False) -> Generation | Iterator[str]:
    """Collect :func:`generate_tokens` into a :class:`Generation`, or stream text pieces."""
    it = generate_tokens(step, new_cache, prompt_ids, params, tokenizer, context_length)
    if stream:
        return _stream(it, params, tokenizer)
    out, text, reason = [], "", "length"
    for tok, piece in it:
        if tok in tokenizer.eos_ids:
            reason = "stop"
            break
        out.append(tok)
        text += piece
        cut = _stop_at(text, params.stop)
        if cut is not None:
            text, reason = text[:cut], "stop"
            break
    return Generation(text, out, len(prompt_ids), reason)


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stream(it, params: SamplingParams, tokenizer: Tokenizer) -> Iterator[str]:
    """Text pieces; holds back a tail that could be the start of a stop string."""
    text, sent = "", 0
    hold = max((len(s) for s in params.stop), default=0)
    for tok, piece in it:
        if tok in tokenizer.eos_ids:
            break
        text += piece
        cut = _stop_at(text, params.stop)
        if cut is not None:
            if cut > sent:
                yield text[sent:cut]
            return
        safe = len(text) - hold
        if safe > sent:
            yield text[sent:safe]
            sent = safe
    if len(text) > sent:
        yield text[sent:]
