"""The per-token cost of constrained decoding (``qadapt bench --constrained VOCAB.gguf``).

For each constraint (a JSON schema, any JSON object, a regular expression, a choice) and a real
vocabulary, decodes ``sequences`` sequences of up to ``tokens`` steps from random logits (the grammar alone
steers them; the end-of-sequence logit is raised a little so that sequences finish) and times, per token,
what constraining adds to a step: computing the grammar's mask, applying it to the logits and advancing
the matcher. Reported beside it: the compile time of each constraint (cold), and a decode step of the
model the numbers should be read against is the bench's own decode figure.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..runtime.constrain import Constraint, compile_constraint

CASES = {
    "json_schema": Constraint("json_schema", {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "maxItems": 4}},
        "required": ["name", "age", "tags"], "additionalProperties": False}),
    "json_object": Constraint("json_object"),
    "regex": Constraint("regex", r"(yes|no), [0-9]{1,6} (apples|pears|plums)\."),
    "choice": Constraint("choice", ["positive", "negative", "neutral"]),
}


def measure(tokenizer: Any, sequences: int = 10, tokens: int = 128, seed: int = 0) -> dict[str, Any]:
    """Per-token overhead (microseconds: median, p90, p99) and compile time (ms) per constraint."""
    from ..runtime.constrain import _lltokenizer

    vocab = tokenizer.vocab_size
    t0 = time.perf_counter()
    _lltokenizer(tokenizer, vocab)  # once per tokenizer (its token trie), apart from the per-constraint compile
    setup_ms = (time.perf_counter() - t0) * 1e3
    rows = []
    for name, c in CASES.items():
        t0 = time.perf_counter()
        grammar = compile_constraint(tokenizer, Constraint(c.kind, c.value), vocab)
        compile_ms = (time.perf_counter() - t0) * 1e3
        g = torch.Generator().manual_seed(seed)
        per_token, finished, steps = [], 0, 0
        for _ in range(sequences):
            m = grammar.matcher()
            for _ in range(tokens):
                logits = torch.randn(vocab, generator=g) * 3
                for e in tokenizer.eos_ids:
                    logits[e] += 4.0
                t = time.perf_counter()
                m.mask(logits)
                spent = time.perf_counter() - t
                tok = int(torch.argmax(logits))
                if tok not in tokenizer.eos_ids:
                    t = time.perf_counter()
                    m.advance(tok)
                    spent += time.perf_counter() - t
                per_token.append(spent)
                steps += 1
                if tok in tokenizer.eos_ids or m.done:
                    finished += 1
                    break
        us = sorted(x * 1e6 for x in per_token)
        rows.append({"constraint": name, "compile_ms": round(compile_ms, 2), "tokens": steps,
                     "finished": f"{finished}/{sequences}", "median_us": round(statistics.median(us), 1),
                     "p90_us": round(us[int(0.9 * (len(us) - 1))], 1), "p99_us": round(us[int(0.99 * (len(us) - 1))], 1)})
    return {"vocab": vocab, "engine": _engine(), "threads": torch.get_num_threads(), "tokenizer_setup_ms":
            round(setup_ms, 1), "rows": rows}


def _engine() -> str:
    import llguidance

    return f"llguidance {llguidance.__version__}"


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Constrained decoding overhead per token ({result['engine']}, vocabulary of {result['vocab']} tokens, "
             f"{result['threads']} torch threads): mask + apply + advance; the tokenizer's one-time setup took "
             f"{result['tokenizer_setup_ms']} ms", "",
             "| constraint | compile (ms) | tokens | finished | median (us) | p90 (us) | p99 (us) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['constraint']} | {r['compile_ms']} | {r['tokens']} | {r['finished']} | {r['median_us']} | "
                     f"{r['p90_us']} | {r['p99_us']} |")
    return "\n".join(lines)
