"""Tokenizers: GGUF vocabularies tokenized exactly as llama.cpp does, transformers folders through transformers.

Both give the runtime the same interface: ``encode`` (BOS/EOS as the model's own rules say, special
tokens in the text parsed as llama.cpp's server and transformers parse them), ``decode``, a
streaming decoder, the end-of-generation ids and the chat template.
"""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import FormatError
from . import chat
from .chat import Message, NoChatTemplate, read_template

log = logging.getLogger(__name__)

__all__ = ["Tokenizer", "GGUFTokenizer", "HFTokenizer", "IdsOnly", "StreamDecoder", "NoChatTemplate", "read_template"]


class Tokenizer:
    """The interface the runtime uses; :meth:`from_gguf` and :meth:`from_folder` build one."""

    bos_id: int | None
    eos_ids: tuple[int, ...]  # every id that ends generation
    add_bos: bool
    chat_template: str | None
    where: str = "the model"

    @classmethod
    def from_gguf(cls, gf) -> "GGUFTokenizer":
        return GGUFTokenizer.from_gguf(gf)

    @classmethod
    def from_folder(cls, folder: str | Path, bos_id: int | None = None, eos_ids: Iterable[int] = ()) -> "HFTokenizer":
        return HFTokenizer.from_folder(folder, bos_id, eos_ids)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``: BOS (and EOS) where the model's tokenizer adds them (``add_special``);
        special-token text such as ``<|eot_id|>`` becomes that token (``parse_special``), as in
        llama.cpp's server and transformers' default."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        raise NotImplementedError

    def stream(self, context: Sequence[int] = ()) -> "StreamDecoder":
        """An incremental decoder for generated ids (``context``: the prompt's ids before them)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, str]:
        """``bos_token``, ``eos_token``, ... texts, as chat templates see them."""
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """The bytes token ``token`` stands for (special tokens as their text): what logprobs report and
        what a grammar matches against."""
        raise NotImplementedError

    def is_special(self, token: int) -> bool:
        """Whether ``token`` is a control token (BOS, EOS, chat markers), which plain text never holds."""
        raise NotImplementedError

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: Sequence[Message], template: str | None = None, *,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return chat.render(template or self.chat_template, messages, self.special_tokens,
                           add_generation_prompt=add_generation_prompt, where=self.where, **kwargs)

    def encode_chat(self, messages: Sequence[Message], template: str | None = None, **kwargs: Any) -> list[int]:
        """The ids of the rendered chat: no BOS/EOS added (the template writes its own), specials parsed,
        as transformers' ``apply_chat_template(messages, add_generation_prompt=True)`` gives them."""
        return self.encode(self.render_chat(messages, template, **kwargs), add_special=False, parse_special=True)


class IdsOnly:
    """Stands in for a tokenizer when a model has none: ids in, no text out, the config's EOS ids."""

    def __init__(self, eos_ids: Iterable[int]):
        self.eos_ids = tuple(eos_ids)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return ""

    def stream(self, context: Sequence[int] = ()) -> "IdsOnly":
        return self

    def push(self, token_id: int) -> str:
        return ""


class StreamDecoder:
    """Generated ids in, text out as it becomes complete (never half a UTF-8 character)."""

    def __init__(self, tok: Tokenizer, context: Sequence[int] = ()):
        self._impl = tok.stream(context)

    def push(self, token_id: int) -> str:
        return self._impl.push(token_id)

    def flush(self) -> str:
        flush = getattr(self._impl, "flush", None)
        return flush() if flush else ""


# ---------------------------------------------------------------------- GGUF
class _PieceStream:
    """Each token's bytes, joined and decoded incrementally (llama.cpp's server renders tokens this way)."""

    def __init__(self, tok: "GGUFTokenizer"):
        self._piece = tok.llama.piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._piece(token_id, False))

    def flush(self) -> str:
        """The held tail at the end (half a character decodes as U+FFFD, as ``decode`` gives it)."""
        return self._utf8.decode(b"", final=True)


class GGUFTokenizer(Tokenizer):
    """A GGUF vocabulary, tokenized by :class:`~qadapt.tokenizer.llama.LlamaTokenizer` (llama.cpp's rules)."""

    def __init__(self, llama, where: str, chat_template: str | None):
        v = llama.vocab
        self.llama, self.where, self.chat_template = llama, where, chat_template
        self.bos_id = v.ids["bos"]
        self.add_bos = v.add_bos
        self.eos_ids = tuple(sorted(v.eog))

    @classmethod
    def from_gguf(cls, gf) -> "GGUFTokenizer":
        from .llama import LlamaTokenizer
        from .vocab import vocab_from_gguf

        if "tokenizer.ggml.tokens" not in gf.metadata:
            raise FormatError(f"{gf.path}: no tokenizer in the metadata (`tokenizer.ggml.tokens` missing)")
        template = gf.get("tokenizer.chat_template")
        return cls(LlamaTokenizer(vocab_from_gguf(gf.metadata, str(gf.path))), str(gf.path),
                   template if isinstance(template, str) else None)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.llama.encode(text, add_special, parse_special)

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.llama.decode(list(ids), skip_special)

    def stream(self, context: Sequence[int] = ()) -> _PieceStream:
        return _PieceStream(self)

    @property
    def vocab_size(self) -> int:
        return len(self.llama.vocab)

    def token_bytes(self, token: int) -> bytes:
        return self.llama.piece(token, True)

    def is_special(self, token: int) -> bool:
        from .vocab import CONTROL

        return bool(self.llama.vocab.attrs[token] & CONTROL)

    @property
    def special_tokens(self) -> dict[str, str]:
        v = self.llama.vocab
        names = {"bos": "bos_token", "eos": "eos_token", "unk": "unk_token", "pad": "pad_token"}
        return {name: v.tokens[v.ids[k]] for k, name in names.items() if v.ids.get(k) is not None}


# ---------------------------------------------------------------------- transformers folders
class _WindowStream:
    """transformers' decode over a short window of ids (vLLM's incremental detokenization): a piece keeps
    the space SentencePiece would drop at the start of a string, and the work per token stays constant."""

    def __init__(self, hf: Any, context: Sequence[int]):
        self.hf = hf
        self.ids = list(context)[-5:]
        self.prefix, self.read = 0, len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.hf.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.hf.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing new, or half a character: wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 64:  # keep the window short
            drop = self.prefix - 5
            self.ids, self.prefix, self.read = self.ids[drop:], 5, self.read - drop
        return text[len(prefix_text):]

    def flush(self) -> str:
        """The held tail at the end (half a character decodes as U+FFFD, as ``decode`` gives it)."""
        prefix_text = self.hf.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        text = self.hf.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return text[len(prefix_text):] if len(text) > len(prefix_text) else ""


class HFTokenizer(Tokenizer):
    """A transformers tokenizer (``AutoTokenizer``): its own BOS/EOS rules, added tokens and chat template."""

    def __init__(self, hf: Any, where: str, eos_ids: Iterable[int]):
        self.hf, self.where = hf, where
        self.bos_id = hf.bos_token_id
        self.add_bos = bool(self.bos_id is not None and hf("", add_special_tokens=True)["input_ids"][:1] == [self.bos_id])
        self.eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))
        self.chat_template = hf.chat_template if isinstance(getattr(hf, "chat_template", None), str) else None
        self._bytes: list[bytes] | None = None
        self._special: frozenset[int] | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, bos_id: int | None = None, eos_ids: Iterable[int] = ()) -> "HFTokenizer":
        """``eos_ids``: the model config's; generation_config.json's and the tokenizer's are added to them."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        try:
            hf = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises many types for a broken folder
            raise FormatError(f"{folder}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
        eos = list(eos_ids)
        gen = folder / "generation_config.json"
        if gen.is_file():
            try:
                g = json.loads(gen.read_text("utf-8")).get("eos_token_id")
            except ValueError:
                raise FormatError(f"{gen}: not valid JSON") from None
            eos += g if isinstance(g, list) else [g] if isinstance(g, int) else []
        if hf.eos_token_id is not None:
            eos.append(hf.eos_token_id)
        return cls(hf, str(folder), eos)

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        from .llama import clean_text

        ids = self.hf(clean_text(text), add_special_tokens=add_special, split_special_tokens=not parse_special)
        return list(ids["input_ids"])

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def stream(self, context: Sequence[int] = ()) -> _WindowStream:
        return _WindowStream(self.hf, context)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def special_tokens(self) -> dict[str, str]:
        return dict(self.hf.special_tokens_map)

    def token_bytes(self, token: int) -> bytes:
        if self._bytes is None:
            self._bytes = _hf_token_bytes(self.hf)
        return self._bytes[token] if 0 <= token < len(self._bytes) else b""

    def is_special(self, token: int) -> bool:
        if self._special is None:
            self._special = frozenset(self.hf.all_special_ids) | frozenset(
                i for i, t in self.hf.added_tokens_decoder.items() if t.special)
        return token in self._special

    def render_chat(self, messages: Sequence[Message], template: str | None = None, *,
                    add_generation_prompt: bool = True, **kwargs: Any) -> str:
        if not (template or self.chat_template):
            return super().render_chat(messages, template, add_generation_prompt=add_generation_prompt, **kwargs)
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        try:
            return self.hf.apply_chat_template(chat, chat_template=template, tokenize=False,
                                               add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:
            from ..errors import InputError

            raise InputError(f"the chat template of {self.where} failed on these messages: "
                             f"{type(e).__name__}: {e}") from None


def _hf_token_bytes(hf: Any) -> list[bytes]:
    """Each token's bytes from a transformers tokenizer: byte-level BPE through GPT-2's byte alphabet,
    SentencePiece-style vocabularies through ``▁`` and ``<0xXX>``; added tokens as their text."""
    from .llama import CHAR_TO_BYTE

    byte_level = False
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        byte_level = '"ByteLevel"' in json.dumps(decoder)
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    out = []
    for i, t in enumerate(hf.convert_ids_to_tokens(list(range(len(hf))))):
        if i in added or t is None:
            out.append((added.get(i) or "").encode("utf-8"))
        elif byte_level:
            out.append(bytes(CHAR_TO_BYTE[c] for c in t) if all(c in CHAR_TO_BYTE for c in t) else t.encode("utf-8"))
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out.append(bytes([int(t[3:5], 16)]))
        else:
            out.append(t.replace("\u2581", " ").encode("utf-8"))
    return out
