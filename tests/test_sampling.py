"""Sampling and text-stream rules against their references.

* The distribution a token is drawn from: transformers' own logits processors and warpers
  (RepetitionPenalty, Temperature, TopK, TopP, Typical, in generate()'s order, which TGI and LoRAX share)
  applied to the same logits. Tolerance 1e-6 absolute on probabilities: both sides are float32 softmaxes
  of the same values (a few ulps apart where the operations are ordered differently).
* OpenAI's frequency / presence penalties and logit_bias: the formula OpenAI documents,
  ``mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty`` (+ bias), written out here.
* Stop strings: OpenAI cuts before the stop (vLLM's default), TGI and LoRAX keep it
  (``generated_text`` ends with it); a stop split across tokens is found; ``ignore_eos``.
"""

from __future__ import annotations

import pytest
import torch

from qadapt.runtime.generate import TextStream
from qadapt.runtime.sampling import Sampler, SamplingParams

V = 64


def hf_distribution(logits: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                                        TypicalLogitsWarper)

    chain = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    chain.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        chain.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1:
        chain.append(TopPLogitsWarper(p.top_p))
    if p.typical_p < 1:
        chain.append(TypicalLogitsWarper(p.typical_p))
    ids = torch.tensor([history]) if history else torch.zeros(1, 0, dtype=torch.long)
    scores = chain(ids, logits.clone().unsqueeze(0))
    return torch.softmax(scores, -1)[0]


CASES = [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.8),
         dict(temperature=0.9, typical_p=0.5), dict(temperature=1.0, top_k=20, top_p=0.9, typical_p=0.7),
         dict(temperature=1.0, repetition_penalty=1.3), dict(temperature=0.5, repetition_penalty=0.8, top_k=10)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_distribution_matches_transformers_processors(case):
    g = torch.Generator().manual_seed(len(str(case)))
    p = SamplingParams(**case)
    for trial in range(20):
        logits = torch.randn(V, generator=g) * 3
        history = torch.randint(0, V, (5,), generator=g).tolist()
        ours = Sampler(p, history).distribution(logits)
        ref = hf_distribution(logits, history, p)
        assert torch.allclose(ours, ref, atol=1e-6), (trial, (ours - ref).abs().max())
        assert set(torch.nonzero(ours).flatten().tolist()) == set(torch.nonzero(ref).flatten().tolist())


def test_openai_penalties_and_logit_bias_follow_the_documented_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, generator=g)
    p = SamplingParams(temperature=1.0, frequency_penalty=0.7, presence_penalty=-0.4, logit_bias=((3, 5.0), (9, -100.0)))
    s = Sampler(p, prompt_ids=[1, 2, 2])  # the prompt does not count: OpenAI's penalties see the completion
    generated = [4, 4, 7]
    for t in generated:
        s.history.append(t)
        s.generated[t] += 1
    counts = torch.zeros(V)
    for t in generated:
        counts[t] += 1
    mu = logits - counts * 0.7 - (counts > 0).float() * -0.4
    mu[3] += 5.0
    mu[9] -= 100.0
    assert torch.allclose(s.distribution(logits), torch.softmax(mu, -1), atol=1e-6)


def test_greedy_is_argmax_and_seeded_sampling_repeats():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(V, generator=g)
    assert Sampler(SamplingParams(), []).next(logits).token == int(torch.argmax(logits))
    p = SamplingParams(temperature=1.0, seed=42)
    a = [Sampler(p, []).next(logits).token for _ in range(3)]
    assert len(set(a)) == 1
    s = Sampler(SamplingParams(temperature=1.0), [])
    assert s.seed is not None  # drawn, so it can be reported and the sample repeated
    again = Sampler(SamplingParams(temperature=1.0, seed=s.seed), [])
    assert s.next(logits).token == again.next(logits).token


def test_choice_reports_model_logprobs_and_alternatives():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(V, generator=g)
    c = Sampler(SamplingParams(top_logprobs=3, logit_bias=((5, 50.0),)), []).next(logits)
    ref = torch.log_softmax(logits, -1)
    assert c.token == 5 and c.logprob == pytest.approx(float(ref[5]))  # the model's, not the biased one
    assert [i for i, _ in c.top] == torch.topk(ref, 3).indices.tolist()


class _Chars:
    """A tokenizer stand-in: token i is the character chr(i), EOS is 0."""

    eos_ids = (0,)

    def stream(self, context=()):
        return self

    def push(self, token):
        return chr(token) if token else ""


def run(text: str, **kw) -> TextStream:
    s = TextStream(_Chars(), [], SamplingParams(**kw))
    s.released = ""
    for ch in text:
        s.released += s.push(ord(ch) if ch != "\0" else 0)
        if s.reason:
            break
    else:
        s.released += s.close()
    return s


def test_stop_strings_cut_or_kept():
    cut = run("hello world", stop=("o w",))
    assert cut.text == cut.released == "hell" and cut.reason == "stop_sequence"
    kept = run("hello world", stop=("o w",), keep_stop=True)
    assert kept.text == kept.released == "hello w" and kept.reason == "stop_sequence"
    assert kept.generated == 7  # the stop's last token is generated
    earliest = run("abcdef", stop=("def", "bc"), keep_stop=True)
    assert earliest.text == "abc"
    assert run("abc", stop=("x",)).text == "abc"


def test_eos_and_ignore_eos():
    s = run("ab\0cd")
    assert s.text == "ab" and s.reason == "eos" and s.generated == 3 and s.tokens == [97, 98]
    s = run("ab\0cd", ignore_eos=True)
    assert s.text == "abcd" and s.reason == "length" and s.generated == 5
