"""GGUF tokenizers: qadapt's short path to transformers' converter gives the ids and text of the long one.

The reference is ``AutoTokenizer.from_pretrained(folder, gguf_file=...)``, the path transformers
documents. qadapt calls the two conversion functions it ends in directly (about 100 MB and a
second less at load); these tests fail if a transformers release makes the two differ.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from models import tokenizer_metadata
from qadapt.formats.gguf import GGUFFile
from qadapt.formats.gguf_export import _add_kv
from qadapt.tokenizer import Tokenizer, _lean_gguf_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "qadapt" / "data" / "demo" / "qadapt-demo.Q4_0.gguf"

TEXTS = ["Hello world, the cat sat on a mat.", "  two leading spaces\nnew line\ttab", "ünïcödé 日本語 🙂",
         "<s>inside</s> <|endoftext|> text", "", " ", "lora adapter quant model"]


def _sentencepiece_metadata() -> dict:
    """A llama-style (SentencePiece BPE) vocabulary: specials, the 256 byte fallbacks, scored pieces, no merges."""
    pieces = ["\u2581", "\u2581t", "he", "\u2581the", "\u2581c", "at", "\u2581cat", "\u2581s", "\u2581sat", "\u2581o",
              "n", "\u2581on", "\u2581a", "\u2581m", "\u2581mat", "l", "o", "r", "a", "d", "p", "e", "q", "u", "h",
              "w", "c", "m", "s", "t", "."]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}


def _write(path: Path, meta: dict) -> Path:
    """A GGUF holding only the tokenizer metadata (and one tensor, as every GGUF has)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        _add_kv(w, key, value)
    w.add_tensor("token_embd.weight", np.zeros((len(meta["tokenizer.ggml.tokens"]), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["gpt2", "llama", "demo"])
def test_short_path_matches_autotokenizer(tmp_path, kind):
    from transformers import AutoTokenizer

    if kind == "demo":
        path = DEMO
    else:
        meta = tokenizer_metadata(330) if kind == "gpt2" else _sentencepiece_metadata()
        path = _write(tmp_path / f"{kind}.gguf", meta)
    lean = _lean_gguf_tokenizer(path)
    assert lean is not None, "transformers moved its GGUF tokenizer functions: qadapt takes the long path"
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = lean.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False), text
        for skip in (False, True):
            assert lean.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def test_gguf_tokenizer_adds_bos_and_knows_eos():
    tok = Tokenizer.from_gguf(GGUFFile(DEMO))
    gf = GGUFFile(DEMO)
    assert tok.encode("the cat")[0] == gf.get("tokenizer.ggml.bos_token_id")
    assert gf.get("tokenizer.ggml.eos_token_id") in tok.eos_ids
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
