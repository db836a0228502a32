"""Choosing each next token: the parameters every API maps onto, and one sequence's sampling state.

:class:`Sampler` is what :func:`qadapt.runtime.generate.run_generation` (``Model.generate``) and the
server's engine both use per sequence. The order of the logit processors is Hugging Face's (and so TGI's
and LoRAX's): penalties and biases, the grammar's mask, then temperature, top-k, top-p, typical-p. The
log-probabilities reported with each token are the model's own (log-softmax of the raw logits), as vLLM
and OpenAI report them.
"""

from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL's, over the prompt and the generated tokens (1 = off)
    seed: int | None = None  # None with sampling: a random seed, reported back
    stop: tuple[str, ...] = ()
    typical_p: float = 1.0  # typical decoding mass (1 = off)
    frequency_penalty: float = 0.0  # OpenAI's, over the generated tokens
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    ignore_eos: bool = False  # end-of-generation tokens do not end the sequence
    keep_stop: bool = False  # the stop string stays in the text (LoRAX, TGI); else it is cut (OpenAI)
    top_logprobs: int = 0  # the k most likely tokens reported with each token
    grammar: Any = None  # a compiled constraint (qadapt.runtime.constrain), or None

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.typical_p <= 1:
            raise InputError(f"typical_p must be in (0, 1], got {self.typical_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise InputError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        return self

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass
class Choice:
    """One chosen token: its id, the model's log-probability of it, and the k most likely alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """One sequence's sampling state: its seeded generator, the tokens the penalties count, its grammar."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids=()):
        self.p = params
        self.history = list(prompt_ids)
        self.generated: Counter = Counter()
        self.seed = params.seed
        if self.seed is None and params.sampling:
            self.seed = secrets.randbits(63)  # reported back, so any sample can be reproduced
        self.gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        self.matcher = params.grammar.matcher() if params.grammar is not None else None
        self.eos = frozenset(eos_ids)

    def next(self, logits: torch.Tensor) -> Choice:
        """The next token from the last position's logits [V] (float32)."""
        raw = logits.float()
        logp = torch.log_softmax(raw, -1)
        x = self._process(raw.clone())
        tok = int(torch.argmax(x)) if not self.p.sampling else self._sample(x)
        top = []
        if self.p.top_logprobs:
            v, i = torch.topk(logp, min(self.p.top_logprobs, logp.numel()))
            top = list(zip(i.tolist(), v.tolist()))
        self.history.append(tok)
        self.generated[tok] += 1
        if self.matcher is not None:
            self.matcher.advance(tok)
        return Choice(tok, float(logp[tok]), top)

    @property
    def grammar_done(self) -> bool:
        return self.matcher is not None and self.matcher.done

    def _process(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if p.repetition_penalty != 1.0 and self.history:
            idx = torch.tensor(sorted(set(self.history)))
            vals = x[idx]
            x[idx] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and self.generated:
            idx = torch.tensor(list(self.generated))
            counts = torch.tensor(list(self.generated.values()), dtype=x.dtype)
            x[idx] -= counts * p.frequency_penalty + p.presence_penalty
        for tok, bias in p.logit_bias:
            if 0 <= tok < x.numel():
                x[tok] += bias
        if self.matcher is not None:
            self.matcher.mask(x)
        return x

    def _sample(self, x: torch.Tensor) -> int:
        return int(torch.multinomial(self._warp(x), 1, generator=self.gen))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities the next token is drawn from (after every processor and warper), for checks
        against other implementations; a one-hot of the argmax when greedy."""
        x = self._process(logits.float().clone())
        if not self.p.sampling:
            return torch.nn.functional.one_hot(torch.argmax(x), x.numel()).float()
        return self._warp(x)

    def _warp(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        x = x / p.temperature
        if p.top_k > 0:
            kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
            x[x < kth] = NEG_INF
        probs = torch.softmax(x, dim=-1)
        if p.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < p.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
            probs = probs / probs.sum()
        if p.typical_p < 1.0:
            probs = _typical(probs, p.typical_p)
        return probs


def _typical(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical decoding (Meister et al.; transformers' TypicalLogitsWarper): keep the tokens whose information is
    closest to the distribution's entropy, up to ``mass`` of probability (at least one)."""
    logp = torch.log(probs)
    ent = -torch.nansum(logp * probs)
    shifted = (-logp - ent).abs()
    order = torch.argsort(shifted)
    cum = probs[order].cumsum(0)
    last = min(int((cum < mass).sum()), probs.numel() - 1)
    keep = order[: last + 1]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def sample_next(logits: torch.Tensor, p: SamplingParams, history: list[int], gen: torch.Generator | None) -> int:
    """One token id from logits [V] (a one-off :class:`Sampler` over ``history``)."""
    s = Sampler(p, history)
    s.gen = gen
    return s.next(logits).token
