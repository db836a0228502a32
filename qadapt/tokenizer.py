"""Tokenizers from GGUF metadata (``tokenizer.ggml.*``) or a transformers folder.

transformers builds a fast tokenizer from GGUF metadata for both the ``gpt2``
(byte-level BPE) and ``llama`` (SentencePiece) models; this wrapper adds the
bos/eos handling qadapt needs and incremental decoding for streaming.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from .errors import FormatError

log = logging.getLogger(__name__)


def _lean_gguf_tokenizer(path: Path) -> Any:
    """transformers' own GGUF tokenizer conversion, without ``AutoTokenizer``'s detour.

    ``AutoTokenizer.from_pretrained(gguf_file=...)`` first resolves a model config through the
    Hub machinery, which imports about a thousand modules (~100 MB resident, a second) before it
    calls these same two functions. None when this transformers lays them out differently
    (then the caller takes the long way); ``tests/test_tokenizer.py`` checks both give the same ids.
    """
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    except ImportError:
        return None
    architecture, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


class Tokenizer:
    def __init__(self, hf: Any, bos_id: int | None, eos_ids: Iterable[int], add_bos: bool,
                 chat_template: str | None = None):
        self.hf = hf
        self.bos_id = bos_id
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, gf) -> "Tokenizer":
        from transformers import AutoTokenizer

        if "tokenizer.ggml.tokens" not in gf.metadata:
            raise FormatError(f"{gf.path}: no tokenizer in the metadata (`tokenizer.ggml.tokens` missing)")
        path = Path(gf.path).resolve()
        try:
            hf = _lean_gguf_tokenizer(path)
            if hf is None:
                hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # transformers raises many types for an odd vocabulary
            raise FormatError(f"{gf.path}: cannot build the tokenizer from its metadata ({type(e).__name__}: {e})") from None
        bos = gf.get("tokenizer.ggml.bos_token_id")
        eos = gf.get("tokenizer.ggml.eos_token_id")
        eos_ids = [eos] if eos is not None else []
        eot = gf.get("tokenizer.ggml.eot_token_id")
        if eot is not None and eot not in eos_ids:
            eos_ids.append(eot)
        add_bos = gf.get("tokenizer.ggml.add_bos_token", gf.get("tokenizer.ggml.model") == "llama")
        return cls(hf, bos, eos_ids, bool(add_bos), gf.get("tokenizer.chat_template"))

    @classmethod
    def from_folder(cls, folder: str | Path, bos_id=None, eos_ids=()) -> "Tokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise FormatError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
        bos = hf.bos_token_id if hf.bos_token_id is not None else bos_id
        eos = list(eos_ids) or ([hf.eos_token_id] if hf.eos_token_id is not None else [])
        return cls(hf, bos, eos, False, getattr(hf, "chat_template", None))

    # ------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The model's chat template, or a plain ``role: content`` fallback when it has none."""
        if self.chat_template:
            try:
                return self.hf.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                   add_generation_prompt=True)
            except Exception as e:
                log.warning("chat template failed (%s); using the plain fallback", e)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"


class StreamDecoder:
    """Turns token ids into text pieces as they come, never splitting a multi-byte character."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.emitted = tok, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece
