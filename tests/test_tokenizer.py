"""Tokenizer details the conformance files do not reach: small vocabularies written by our tests, streaming.

References: the ``tokenizers`` library (the BPE the tiny vocabulary was trained with, and the demo's),
transformers' ``decode``, and llama.cpp's detokenizer through llama_cpp_tokenizer.json.gz. Ids and texts
are compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from models import save_tokenizer, tiny_bpe, tokenizer_metadata
from qadapt.formats.gguf import GGUFFile
from qadapt.models.gguf_export import _add_kv
from qadapt.tokenizer import StreamDecoder, Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "qadapt" / "data" / "demo" / "qadapt-demo.Q4_0.gguf"
TEXTS = ["Hello world, the cat sat on a mat.", "  two leading spaces\nnew line\ttab", "ünïcödé 日本語 🙂",
         "<s>inside</s> <|endoftext|> text", "", " ", "lora adapter quant model", "x  y   z \n\n "]


def _write(path: Path, meta: dict) -> Path:
    """A GGUF holding only the tokenizer metadata (and one tensor, as every model file has)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        _add_kv(w, key, value)
    w.add_tensor("token_embd.weight", np.zeros((len(meta["tokenizer.ggml.tokens"]), 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tokenizers_bpe():
    """The tiny vocabulary as the ``tokenizers`` library's byte-level BPE (GPT-2's regex), specials added."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers

    tokens, merges = tiny_bpe()
    tok = HFTok(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<s>"])
    return tok


def test_gguf_bpe_equals_tokenizers_library(tmp_path):
    """A byte-level BPE written to GGUF as `gpt-2` tokenizes as the `tokenizers` library it was trained with,
    BOS added by the file's `add_bos_token`, specials in the text parsed (both sides)."""
    meta = tokenizer_metadata(330)
    tok = Tokenizer.from_gguf(GGUFFile(_write(tmp_path / "bpe.gguf", meta)))
    ref = _tokenizers_bpe()
    for text in TEXTS:
        assert tok.encode(text) == [1] + ref.encode(text).ids, text
        assert tok.encode(text, add_special=False) == ref.encode(text).ids, text
        ids = ref.encode(text).ids
        assert tok.decode(ids, skip_special=False) == ref.decode(ids, skip_special_tokens=False), text


def test_demo_file_tokenizes_as_its_training_tokenizer():
    """The demo's GGUF says `gpt-2` (its tokenizer was trained with ByteLevel's GPT-2 regex): llama.cpp's rules
    for that name give the training tokenizer's ids (a wrong `default` split `=>` and digits differently)."""
    from tokenizers import Tokenizer as HFTok

    tok = Tokenizer.from_gguf(GGUFFile(DEMO))
    ref = HFTok.from_file(str(DEMO.parent / "tokenizer.json"))
    gf = GGUFFile(DEMO)
    assert gf.get("tokenizer.ggml.pre") == "gpt-2"
    for text in ("Q: red cow and the queen =>", "Q: 9 6 0 8 =>", "frog, bee, ship, mouse, lion", "a  b\n"):
        assert tok.encode(text) == [gf.get("tokenizer.ggml.bos_token_id")] + ref.encode(text).ids, text


def test_stream_pieces_join_to_the_text_never_half_a_character(llama_root):
    """SentencePiece byte fallback splits 🦙 into four byte tokens: the stream holds them back until the character
    is whole; joined, the pieces are llama.cpp's rendering (each token's piece, the leading space kept)."""
    tok = Tokenizer.from_gguf(GGUFFile(llama_root / "models" / "ggml-vocab-llama-spm.gguf"))
    text = "this is 🦙.cpp and ünï"
    ids = tok.encode(text, add_special=False)
    s = StreamDecoder(tok)
    pieces = [s.push(i) for i in ids]
    assert "".join(pieces) == " " + text  # SentencePiece's prefix space: its first piece is "▁this"
    assert tok.decode(ids) == text  # llama_detokenize drops that space
    assert all("\ufffd" not in p for p in pieces) and pieces.count("") >= 3


def test_folder_stream_keeps_the_leading_space(tmp_path):
    """transformers folders stream over a short window after the prompt: pieces join to transformers' decode
    of prompt + generation, minus the prompt's text."""
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tok = Tokenizer.from_folder(tmp_path)
    prompt, gen = hf("the cat")["input_ids"], hf(" sat on a mat. hello world")["input_ids"]
    s = StreamDecoder(tok, prompt)
    joined = "".join(s.push(i) for i in gen)
    assert joined == hf.decode(prompt + gen)[len(hf.decode(prompt)):] == " sat on a mat. hello world"


def test_text_with_lone_surrogates_tokenizes(tmp_path, llama_root):
    """A JSON body may carry a lone surrogate (`"\\ud800"`), which no UTF-8 holds: both tokenizers read it as
    U+FFFD (llama.cpp's reading of an invalid sequence), never raise."""
    save_tokenizer(tmp_path)
    folder = Tokenizer.from_folder(tmp_path)
    assert folder.encode("a\ud800b") == folder.encode("a\ufffdb")
    gguf_tok = Tokenizer.from_gguf(GGUFFile(llama_root / "models" / "ggml-vocab-llama-bpe.gguf"))
    assert gguf_tok.encode("a\ud800b") == gguf_tok.encode("a\ufffdb")


def test_vocabulary_without_tokens_or_with_bad_arrays_is_a_format_error(tmp_path):
    from qadapt.errors import FormatError

    meta = tokenizer_metadata(330)
    bad = dict(meta, **{"tokenizer.ggml.token_type": [1, 2]})
    with pytest.raises(FormatError, match="token_type"):
        Tokenizer.from_gguf(GGUFFile(_write(tmp_path / "bad.gguf", bad)))
    nomerge = {k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(FormatError, match="merges"):
        Tokenizer.from_gguf(GGUFFile(_write(tmp_path / "nomerge.gguf", nomerge)))
