"""GGUF tokenizers against llama.cpp: its own test files and its recorded runtime behaviour.

References (no qadapt code in them):
- ``models/ggml-vocab-*.gguf.inp`` / ``.out`` of the llama-cpp-python 0.3.36 sdist: the ids llama.cpp's
  ``test-tokenizer-0`` expects for each string (no BOS/EOS added, special tokens not parsed);
- ``tests/data/llama_cpp_tokenizer.json.gz``: llama.cpp's ``llama_tokenize`` in all four modes (BOS/EOS
  added or not, special-token text parsed or not) and ``llama_detokenize`` (specials rendered or not), for
  those files plus the vocabularies without .out files (aquila, baichuan, gpt-neox) and for every
  pre-tokenizer name llama.cpp knows, on its GPT-2 vocabulary. Recorded with llama.cpp itself by
  ``tools/tokenizer_fixtures.py`` (llama-cpp-python 0.3.36).
Token ids are integers: the tolerance is none.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from llama_sdist import REFUSED_VOCABS, inp_out, synthetic_pre_vocab, vocab_names
from qadapt.errors import UnsupportedError
from qadapt.formats.gguf import GGUFFile
from qadapt.tokenizer import GGUFTokenizer
from qadapt.tokenizer.pretokenize import known_names

FIXTURE = Path(__file__).parent / "data" / "llama_cpp_tokenizer.json.gz"


@pytest.fixture(scope="session")
def recorded() -> dict:
    return json.loads(gzip.decompress(FIXTURE.read_bytes()))


_TOKENIZERS: dict[str, GGUFTokenizer] = {}


def _tok(path: Path) -> GGUFTokenizer:
    if str(path) not in _TOKENIZERS:
        _TOKENIZERS[str(path)] = GGUFTokenizer.from_gguf(GGUFFile(path))
    return _TOKENIZERS[str(path)]


def _vocab(root: Path, name: str) -> Path:
    return root / "models" / f"ggml-vocab-{name}.gguf"


def test_every_vocab_file_is_read_or_refused_by_name(llama_root, recorded):
    names = vocab_names(llama_root)
    assert len(names) >= 19, names
    for name in names:
        if name in REFUSED_VOCABS:
            with pytest.raises(UnsupportedError, match=f"tokenizer model `{REFUSED_VOCABS[name]}`"):
                GGUFTokenizer.from_gguf(GGUFFile(_vocab(llama_root, name)))
        else:
            assert name in recorded["vocabs"], f"{name}: no record; rerun tools/tokenizer_fixtures.py"


@pytest.mark.parametrize("name", ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2",
                                  "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"])
def test_inp_out_files(llama_root, name):
    """Every string of llama.cpp's own test file gives its expected ids (add_special=false, parse_special=false)."""
    cases = inp_out(llama_root, name)
    assert cases, f"{name} has no .inp/.out files in the sdist"
    tok = _tok(_vocab(llama_root, name))
    wrong = [(t, want, got) for t, want in cases if (got := tok.encode(t, False, False)) != want]
    assert not wrong, f"{name}: {len(cases) - len(wrong)}/{len(cases)} match; first: {wrong[0]}"


def _check(tok: GGUFTokenizer, texts: list[str], rec: dict, label: str) -> None:
    for mode, got_all in rec.items():
        if mode in ("decode", "decode_ids", "specials"):
            continue
        add, parse = bool(int(mode[0])), bool(int(mode[1]))
        for text, want in zip(texts, got_all):
            assert tok.encode(text, add, parse) == want, (label, mode, text)
    sp = rec["specials"]  # llama.cpp's end-of-generation set, BOS / EOS ids and whether it adds them
    assert sorted(tok.eos_ids) == sp["eog"], label
    assert (tok.bos_id if tok.bos_id is not None else -1) == sp["bos"], label
    assert (tok.llama.vocab.add_bos, tok.llama.vocab.add_eos) == (sp["add_bos"], sp["add_eos"]), label
    for ids, (plain, special) in zip(rec["decode_ids"], rec["decode"]):
        assert tok.decode(ids, skip_special=True) == plain.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), (label, ids)
        assert tok.decode(ids, skip_special=False) == special.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), (label, ids)


def test_llama_cpp_runtime_record_per_vocab(llama_root, recorded):
    """All four encode modes and both decode modes equal llama.cpp's, for every vocabulary file."""
    for name, rec in recorded["vocabs"].items():
        cases = inp_out(llama_root, name) or []
        texts = [t for t, _ in cases] + recorded["texts"]
        _check(_tok(_vocab(llama_root, name)), texts, rec, name)


def test_every_pre_tokenizer_name(llama_root, recorded, tmp_path_factory):
    """Each `tokenizer.ggml.pre` llama.cpp knows splits text as llama.cpp splits it (on its GPT-2 vocabulary)."""
    assert sorted(recorded["pre"]) == known_names()
    out = tmp_path_factory.mktemp("pre")
    for pre, rec in recorded["pre"].items():
        tok = _tok(synthetic_pre_vocab(llama_root, pre, out))
        _check(tok, recorded["pre_texts"], rec, pre)


def test_unknown_pre_tokenizer_is_refused_by_name(llama_root, tmp_path):
    from qadapt.models.gguf_export import set_metadata

    path = set_metadata(_vocab(llama_root, "gpt-2"), tmp_path / "x.gguf", {"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(UnsupportedError, match="no-such-pre"):
        GGUFTokenizer.from_gguf(GGUFFile(path))
    path = set_metadata(_vocab(llama_root, "gpt-2"), tmp_path / "k.gguf", {"tokenizer.ggml.pre": "kimi-k2"})
    with pytest.raises(UnsupportedError, match="kimi-k2"):
        GGUFTokenizer.from_gguf(GGUFFile(path))


def test_bos_rules_and_special_text(llama_root):
    """llama.cpp's BOS rules where the key is absent (llama-bpe adds 128000, qwen2 adds nothing, SentencePiece adds
    1), and special-token text typed by a user never leaves the vocabulary (transformers' GGUF conversion gives
    `<|endoftext|>` id 128256 of a 128256-token Llama 3 vocabulary)."""
    llama3 = _tok(_vocab(llama_root, "llama-bpe"))
    assert llama3.encode("Hello")[0] == 128000 and llama3.bos_id == 128000
    assert _tok(_vocab(llama_root, "qwen2")).encode("Hello") == _tok(_vocab(llama_root, "qwen2")).encode("Hello", False)
    assert _tok(_vocab(llama_root, "llama-spm")).encode("Hello")[0] == 1
    for text in ("Hi<|endoftext|>there", "<|begin_of_text|><|eot_id|>", "<|reserved_special_token_250|>"):
        ids = llama3.encode(text)
        assert max(ids) < llama3.vocab_size, text
    assert llama3.encode("a<|eot_id|>b", False, True)[1] == 128009
    assert 128009 not in llama3.encode("a<|eot_id|>b", False, False)
    assert {128001, 128009} <= set(llama3.eos_ids)  # <|end_of_text|>, <|eot_id|>: in llama.cpp's EOG set
