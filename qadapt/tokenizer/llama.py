"""Tokenization of GGUF vocabularies, as llama.cpp tokenizes (``llama_vocab::impl::tokenize``).

Special tokens are cut out of the text first (control and unknown ones only when asked to parse
them; user-defined ones always), then each piece of plain text goes through the vocabulary's
algorithm: SentencePiece's score-ordered merges (``spm``) or byte-pair merges by rank over the
pre-tokenizer's words (``bpe``). Both are llama.cpp's algorithms: the same symbols, the same
queue order (lowest rank / highest score first, leftmost on ties) and the same byte fallbacks.
"""

from __future__ import annotations

import heapq
import re
from collections import OrderedDict

from .vocab import BYTE, CONTROL, LSTRIP, NORMAL, RSTRIP, UNKNOWN, USER_DEFINED, Vocab

_SPACE_MARK = "\u2581"  # SentencePiece's visible space
_SURROGATE = re.compile("[\ud800-\udfff]")
_C_SPACE = " \t\n\v\f\r"  # C's isspace: what a special token's lstrip / rstrip removes


def _gpt2_bytes() -> list[str]:
    """GPT-2's byte -> printable character map (printable bytes map to themselves, the rest to 256 + n)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = [""] * 256, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


BYTE_TO_CHAR = _gpt2_bytes()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
_ENCODE_BYTES = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def clean_text(text: str) -> str:
    """Python strings may hold lone surrogates (a JSON body's ``"\\ud800"``) that no UTF-8 can carry: each
    becomes one U+FFFD, the replacement character."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


class LlamaTokenizer:
    """Encode / decode with a :class:`Vocab`, exactly as llama.cpp's ``llama_tokenize`` / ``llama_detokenize``."""

    def __init__(self, vocab: Vocab, word_cache: int = 65536):
        self.vocab = vocab
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = word_cache
        v = vocab
        self._byte_ids = [self._byte_token(b) for b in range(256)]
        #: token -> its bytes, filled on first use (llama.cpp renders pieces on demand too; building all of a
        #: 150k vocabulary's at load costs ~0.1-0.5 s that most runs never need)
        self._pieces: list[bytes | None] = [None] * len(v)

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_special: bool = True, parse_special: bool = False,
               space_prefix: bool = True) -> list[int]:
        """``space_prefix=False``: text that continues a sequence (no SentencePiece space at its start)."""
        v = self.vocab
        out: list[int] = []
        if add_special and v.add_bos:
            out.append(v.ids["bos"])
        prev_special = space_prefix  # SentencePiece adds its leading space at the start and after each special token
        for frag in self._partition(clean_text(text), parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            if v.kind == "spm":
                piece = (" " if v.add_space_prefix and prev_special else "") + frag
                self._spm(piece.replace(" ", _SPACE_MARK), out)
                prev_special = False
            else:
                self._bpe(frag.replace(" ", _SPACE_MARK) if v.escape_whitespaces else frag, out)
        if add_special and v.add_eos:
            out.append(v.ids["eos"])
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """The text with special tokens cut out, longest first (llama.cpp's ``tokenizer_st_partition``)."""
        v = self.vocab
        frags: list[str | int] = [text] if text else []
        for sid in v.specials:
            attr = v.attrs[sid]
            if not parse_special and attr & (CONTROL | UNKNOWN):
                continue  # user-defined tokens are cut out even when specials are not parsed
            tok = v.tokens[sid]
            if not any(isinstance(f, str) and tok in f for f in frags):
                continue
            new: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok not in f:
                    new.append(f)
                    continue
                parts = f.split(tok)
                for j, part in enumerate(parts):
                    if j > 0:
                        new.append(sid)
                    if j + 1 < len(parts) and attr & LSTRIP:
                        part = part.rstrip(_C_SPACE)
                    if j > 0 and attr & RSTRIP:
                        part = part.lstrip(_C_SPACE)
                    if part:
                        new.append(part)
            frags = new
        return frags

    # ------------------------------------------------------------------ SentencePiece
    def _spm(self, text: str, out: list[int]) -> None:
        v = self.vocab
        to_id, scores = v.to_id, v.scores

        def priority(a: str, b: str) -> float | None:  # the merged token's score, highest first
            t = to_id.get(a + b)
            return None if t is None else -(scores[t] if scores else 0.0)

        for s in _merge(list(text), priority):
            t = to_id.get(s)
            if t is not None:
                out.append(t)
            else:  # a character the vocabulary lacks: its UTF-8 bytes
                out.extend(self._byte_ids[b] for b in s.encode("utf-8") if self._byte_ids[b] is not None)

    # ------------------------------------------------------------------ BPE
    def _bpe(self, text: str, out: list[int]) -> None:
        v = self.vocab
        for word in v.pre.split(text):
            if v.pre.byte_encode:
                word = word.encode("utf-8").decode("latin-1").translate(_ENCODE_BYTES)
            ids = self._cache.get(word)
            if ids is None:
                ids = self._bpe_word(word)
                self._cache[word] = ids
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        v = self.vocab
        to_id, ranks = v.to_id, v.merges
        if v.pre.ignore_merges and word in to_id:
            return [to_id[word]]
        if v.pre.type == "gemma4" and word.strip("\n") == "" and word in to_id:
            return [to_id[word]]  # llama.cpp's Gemma 4 rule: a run of newlines that is a token stays one

        def priority(a: str, b: str) -> int | None:  # the merge's rank, lowest first
            # llama.cpp splits a merge line at its first space after the first character
            return None if " " in a[1:] else ranks.get(a + " " + b)

        ids: list[int] = []
        for s in _merge(list(word), priority):
            t = to_id.get(s)
            if t is not None:
                ids.append(t)
            elif v.pre.byte_encode:  # llama.cpp looks up each UTF-8 byte of the symbol as a one-byte token
                ids.extend(to_id[c] for c in s if ord(c) < 128 and c in to_id)
            else:
                ids.extend(self._byte_ids[b] for b in s.encode("utf-8") if self._byte_ids[b] is not None)
        return ids

    def _byte_token(self, b: int) -> int | None:
        """The token for one raw byte: ``<0xXX>`` (SentencePiece, Gemma 4), else the byte's own text; else unknown."""
        v = self.vocab
        if v.kind == "bpe" and v.pre.byte_encode:
            t = v.to_id.get(BYTE_TO_CHAR[b])
        else:
            t = v.to_id.get(f"<0x{b:02X}>")
            if t is None and b < 128:
                t = v.to_id.get(chr(b))
        return t if t is not None else v.ids.get("unk")

    # ------------------------------------------------------------------ decode
    def _piece(self, i: int) -> bytes:
        """The bytes token ``i`` stands for when rendered (llama.cpp's ``token_to_piece`` with special=true)."""
        v = self.vocab
        text, attr = v.tokens[i], v.attrs[i]
        if attr & (CONTROL | UNKNOWN | USER_DEFINED):
            return text.encode("utf-8")
        if attr & NORMAL:
            if v.kind == "spm" or v.escape_whitespaces:
                return text.replace(_SPACE_MARK, " ").encode("utf-8")
            return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else c.encode("utf-8") for c in text)
        if attr & BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""  # unused / undefined tokens render as nothing

    def piece(self, token: int, special: bool = True) -> bytes:
        """Token ``token``'s bytes; control and unknown tokens are empty unless ``special``."""
        if not special and self.vocab.attrs[token] & (CONTROL | UNKNOWN):
            return b""
        p = self._pieces[token]
        if p is None:
            p = self._pieces[token] = self._piece(token)
        return p

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """llama.cpp's ``llama_detokenize(ids, remove_special=false, unparse_special=not skip_special)``:
        SentencePiece drops the first token's leading space; vocabularies that clean spaces drop the space
        llama.cpp removes before ``? ! . ,`` and some apostrophes."""
        v = self.vocab
        parts = []
        for k, t in enumerate(ids):
            p = self.piece(t, not skip_special)
            if k == 0 and v.add_space_prefix and p.startswith(b" "):
                p = p[1:]
            parts.append(p)
        text = b"".join(parts)
        if v.clean_spaces:
            text = _clean_spaces(text)
        return text.decode("utf-8", "replace")


def _merge(syms: list[str], priority) -> list[str]:
    """llama.cpp's merge loop, shared by SentencePiece and BPE: adjacent symbols join in order of
    ``priority(left, right)`` (lowest first, then leftmost; None: never), each merge queueing the pairs it
    makes with its neighbours; a queued pair whose symbols changed since is skipped. Returns the symbols."""
    n = len(syms)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    if n:
        nxt[-1] = -1
    heap: list[tuple] = []

    def push(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            p = priority(syms[left], syms[right])
            if p is not None:
                heapq.heappush(heap, (p, left, right, syms[left] + syms[right]))

    for i in range(1, n):
        push(i - 1, i)
    while heap:
        _, left, right, text = heapq.heappop(heap)
        if not syms[left] or not syms[right] or syms[left] + syms[right] != text:
            continue
        syms[left], syms[right] = text, ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    return [s for s in syms if s]


def _clean_spaces(t: bytes) -> bytes:
    """llama.cpp's three clean-up passes over detokenized bytes (each keeps the first byte and looks at the
    original neighbours of every later one)."""
    if not t:
        return t
    out = bytearray(t[:1])
    for i in range(1, len(t)):  # " ?", " !", " .", " ,": the space goes
        if t[i - 1] == 0x20 and t[i] in b"?!.,":
            out.pop()
        out.append(t[i])
    t = bytearray(out)
    out, i = bytearray(t[:1]), 1
    while i < len(t):  # " ' ": both spaces go (the second is blanked, as llama.cpp writes a NUL over it)
        x = t[i]
        if x == 0x27 and i + 1 < len(t) and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            out.pop()
            t[i + 1] = 0
            out.append(x)
            i += 2
            continue
        out.append(x)
        i += 1
    t = bytes(out)
    out = bytearray(t[:1])
    for i in range(1, len(t)):  # " 's", " 'm", " 're", " 've": the space goes (" 't", " 'd", " 'll" keep it)
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < len(t):
            if t[i + 1] in b"sm" or (i + 2 < len(t) and t[i + 1:i + 3] in (b"re", b"ve")):
                out.pop()
        out.append(x)
    return bytes(out)
