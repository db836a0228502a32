"""Constrained decoding (llguidance) with the tokenizers qadapt loads, checked by independent validators.

Each case decodes with random logits (the hardest input: nothing steers the text toward the grammar),
then validates the text with a reference that knows nothing of llguidance: ``jsonschema`` for JSON
schemas, ``re.fullmatch`` for regular expressions, membership for choices. Real vocabularies from
llama.cpp's test files (SentencePiece and byte-level BPE, GGUF) and a transformers folder (Llama 3's
tokenizer) are all covered, since a grammar engine sees only token bytes: a byte wrong in one table
shows as text that fails its validator.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from qadapt.errors import InputError
from qadapt.runtime.constrain import Constraint, compile_constraint
from qadapt.runtime.sampling import Sampler, SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
NUMBERS = {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4}
REGEX = r"(yes|no), [0-9]{1,3} (apples|pears)\."
CHOICES = ["red", "green", "blue sky"]


def tokenizers(root, tmp):
    from llama_sdist import llama3_folder_tokenizer

    from qadapt.formats.gguf import GGUFFile
    from qadapt.tokenizer import Tokenizer

    out = {}
    for name in ("llama-spm", "llama-bpe", "qwen2", "phi-3"):
        path = root / "models" / f"ggml-vocab-{name}.gguf"
        if path.exists():
            out[name] = Tokenizer.from_gguf(GGUFFile(path))
    out["hf-llama3"] = Tokenizer.from_folder(llama3_folder_tokenizer(root, tmp / "l3"), eos_ids=[128001, 128009])
    return out


@pytest.fixture(scope="module")
def toks(llama_root, tmp_path_factory):
    return tokenizers(llama_root, tmp_path_factory.mktemp("cdec"))


def decode_with(tok, constraint, seed, max_tokens=80, bias_eos=0.0):
    vocab = tok.vocab_size
    grammar = compile_constraint(tok, constraint, vocab)
    s = Sampler(SamplingParams(grammar=grammar), [])
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_tokens):
        logits = torch.randn(vocab, generator=g) * 4
        for e in tok.eos_ids:
            logits[e] += bias_eos
        t = s.next(logits).token
        if t in tok.eos_ids:
            return tok.decode(out), True
        out.append(t)
        if s.grammar_done:
            return tok.decode(out), True
    return tok.decode(out), False


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "phi-3", "hf-llama3"])
def test_outputs_validate_for_every_tokenizer(toks, name):
    if name not in toks:
        pytest.skip(f"{name} vocabulary not in this llama.cpp")
    tok = toks[name]
    finished = 0
    for seed in range(6):
        text, done = decode_with(tok, Constraint("regex", REGEX), seed)
        assert done and re.fullmatch(REGEX, text), (name, text)
        text, done = decode_with(tok, Constraint("choice", CHOICES), seed)
        assert done and text in CHOICES, (name, text)
        # JSON: random logits may keep a string open; when the grammar finishes, the text must validate,
        # and whatever is produced must be a prefix the schema could still accept (checked on finishing)
        for schema in (PERSON, NUMBERS):
            text, done = decode_with(tok, Constraint("json_schema", schema), seed, max_tokens=120, bias_eos=8.0)
            if done:
                jsonschema.validate(json.loads(text), schema)
                finished += 1
        text, done = decode_with(tok, Constraint("json_object"), seed, max_tokens=120, bias_eos=8.0)
        if done:
            assert isinstance(json.loads(text), dict)
            finished += 1
    assert finished >= 6, f"{name}: only {finished} JSON outputs finished"  # the checks above ran


def test_bad_constraints_are_input_errors(toks):
    tok = toks["llama-bpe"]
    for c, words in [(Constraint("regex", "(unclosed"), "regular expression"),
                     (Constraint("json_schema", "{not json"), "not valid JSON"),
                     (Constraint("json_schema", [1, 2]), "must be an object"),
                     (Constraint("lark", "start: ???"), "grammar"),
                     (Constraint("choice", []), "non-empty"),
                     (Constraint("xml", "<a/>"), "unknown constraint")]:
        with pytest.raises(InputError, match=words):
            compile_constraint(tok, c, tok.vocab_size)


def test_compiled_once_and_padded_vocabularies(toks):
    """A model's embedding may have more rows than its tokenizer has tokens: they are never allowed."""
    tok = toks["llama-spm"]
    a = compile_constraint(tok, Constraint("regex", "[ab]+"), tok.vocab_size + 64)
    assert compile_constraint(tok, Constraint("regex", "[ab]+"), tok.vocab_size + 64) is a
    m = a.matcher()
    logits = torch.zeros(tok.vocab_size + 64)
    m.mask(logits)
    assert torch.isinf(logits[tok.vocab_size:]).all()
    allowed = torch.nonzero(~torch.isinf(logits)).flatten().tolist()
    assert allowed and all(set(tok.decode([i])) <= {"a", "b"} for i in allowed)
