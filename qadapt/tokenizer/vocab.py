"""A GGUF vocabulary as llama.cpp reads it: tokens, their attributes, special ids and the BOS/EOS rules.

Everything here follows ``llama_vocab::impl::load`` (llama.cpp, as vendored by llama-cpp-python
0.3.36): the defaults per tokenizer model where a key is absent, the flags each pre-tokenizer name
sets, the end-of-generation set llama.cpp derives from token texts, and the per-model strip rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import FormatError, UnsupportedError
from .pretokenize import PreTokenizer, pre_tokenizer

log = logging.getLogger(__name__)

# token attributes (llama.h's llama_token_attr)
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
LSTRIP, RSTRIP = 1 << 7, 1 << 8
#: GGUF ``tokenizer.ggml.token_type`` values -> attributes (0 and unknown values: undefined, no attribute)
_TYPE_ATTR = {1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}

#: tokenizer model -> (kind, default special ids); kinds: spm (SentencePiece), bpe
_MODELS = {"llama": ("spm", {"bos": 1, "eos": 2, "unk": 0}), "gpt2": ("bpe", {"bos": 11, "eos": 11}),
           "gemma4": ("bpe", {})}
_REFUSED_MODELS = {"bert": "WordPiece (BERT embedding models)", "t5": "Unigram (T5)", "rwkv": "RWKV's trie",
                   "plamo2": "PLaMo-2's", "hybriddna": "HybridDNA's", "whitespace": "a whitespace (embedding) model's",
                   "no_vocab": "no vocabulary", "none": "no vocabulary", "test": "llama.cpp's test"}
#: special id keys: name -> GGUF key suffixes (the later, deprecated ones too)
_ID_KEYS = {"bos": ["bos_token_id"], "eos": ["eos_token_id"], "eot": ["eot_token_id"], "eom": ["eom_token_id"],
            "unk": ["unknown_token_id"], "sep": ["seperator_token_id"], "pad": ["padding_token_id"],
            "mask": ["mask_token_id"], "fim_pre": ["fim_pre_token_id", "prefix_token_id"],
            "fim_suf": ["fim_suf_token_id", "suffix_token_id"], "fim_mid": ["fim_mid_token_id", "middle_token_id"],
            "fim_pad": ["fim_pad_token_id"], "fim_rep": ["fim_rep_token_id"], "fim_sep": ["fim_sep_token_id"]}
#: texts llama.cpp recognises as these specials when no key names them (forcing them to control tokens)
_BY_TEXT = {
    "eot": ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"],
    "eom": ["<|eom_id|>"],
    "fim_pre": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"],
    "fim_suf": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"],
    "fim_mid": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"],
    "fim_pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep": ["<|file_sep|>"],
}
#: token texts that end generation (llama.cpp's list), on top of eos / eot / eom and fim pad / repo / sep
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~["])
#: gpt-oss's markers, rendered as text (llama.cpp sets them user-defined)
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


@dataclass
class Vocab:
    """Tokens, attributes and rules of one GGUF vocabulary (what the tokenizer algorithms need)."""

    kind: str  # "spm" | "bpe"
    tokens: list[str]
    attrs: list[int]
    scores: list[float] | None
    merges: dict[str, int] | None  # "left right" -> rank (first occurrence wins), BPE only
    pre: PreTokenizer | None  # BPE only
    ids: dict[str, int | None]  # bos, eos, eot, eom, unk, sep, pad, mask, fim_*
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    escape_whitespaces: bool
    eog: frozenset[int]
    to_id: dict[str, int] = field(repr=False, default_factory=dict)
    specials: list[int] = field(repr=False, default_factory=list)  # control / user-defined / unknown, longest first

    def __len__(self) -> int:
        return len(self.tokens)


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    v = meta.get("tokenizer.ggml." + key)
    return default if v is None else bool(v)


def vocab_from_gguf(meta: Mapping[str, Any], where: str) -> Vocab:
    """A :class:`Vocab` from GGUF metadata (``tokenizer.ggml.*``), with llama.cpp's defaults and rules."""
    model = meta.get("tokenizer.ggml.model")
    if model in _REFUSED_MODELS:
        raise UnsupportedError(f"{where}: tokenizer model `{model}` ({_REFUSED_MODELS[model]} tokenizer) is not "
                               f"supported; qadapt reads SentencePiece (`llama`) and BPE (`gpt2`, `gemma4`) vocabularies")
    if model not in _MODELS:
        raise UnsupportedError(f"{where}: unknown tokenizer model `tokenizer.ggml.model` = {model!r}")
    kind, default_ids = _MODELS[model]
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) != {str}:
        raise FormatError(f"{where}: `tokenizer.ggml.tokens` must be a non-empty list of strings")
    n = len(tokens)
    if "" in tokens:
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    scores = _array(meta, "scores", n, (int, float), where)
    types = _array(meta, "token_type", n, (int,), where)
    attrs = [NORMAL] * n if types is None else [_TYPE_ATTR.get(int(t), 0) for t in types]
    pre = merges = None
    add_bos, clean_spaces, escape = kind == "spm", kind == "bpe", False
    ids: dict[str, int | None] = {k: default_ids.get(k) for k in _ID_KEYS}
    if kind == "bpe":
        name = "gemma4" if model == "gemma4" else meta.get("tokenizer.ggml.pre")
        pre = pre_tokenizer(name, where)
        if name in (None, ""):
            log.warning("%s: no `tokenizer.ggml.pre`; using llama.cpp's `default` pre-tokenizer (as llama.cpp does, "
                        "which warns that generation quality will be degraded: consider reconverting the model)", where)
        add_bos, clean_spaces, escape = pre.add_bos, pre.clean_spaces, pre.escape_whitespaces
        if pre.no_bos:
            ids["bos"] = None
        merges = _merges(meta, where)
    for k, v in list(ids.items()):
        if v is not None and v >= n:
            ids[k] = None  # llama.cpp: a default special id past the vocabulary is disabled
    for k, keys in _ID_KEYS.items():
        for key in keys:
            v = meta.get("tokenizer.ggml." + key)
            if isinstance(v, int) and not isinstance(v, bool):
                if 0 <= v < n:
                    ids[k] = v
                else:
                    log.warning("%s: `tokenizer.ggml.%s` = %s is outside the vocabulary of %d; using %s", where,
                                key, v, n, ids[k])
    add_bos = _flag(meta, "add_bos_token", add_bos)
    if pre is not None and pre.type == "gemma4":
        add_bos = True  # llama.cpp overrides Gemma 4's key
    add_eos = _flag(meta, "add_eos_token", False)
    add_space_prefix = _flag(meta, "add_space_prefix", kind == "spm")
    to_id = {t: i for i, t in enumerate(tokens)}  # a repeated text maps to its last id, as in llama.cpp
    eog = _end_of_generation(tokens, attrs, to_id, ids)
    for k, want in (("bos", add_bos), ("eos", add_eos)):
        if want and ids[k] is None:
            raise FormatError(f"{where}: the vocabulary adds a {k.upper()} token but has none "
                              f"(`tokenizer.ggml.{k}_token_id`)")
    specials = [i for i, a in enumerate(attrs) if a & (CONTROL | USER_DEFINED | UNKNOWN)]
    specials.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
    _strip_rules(meta, tokens, attrs, to_id, specials)
    return Vocab(kind, tokens, attrs, scores, merges, pre, ids, add_bos, add_eos, add_space_prefix, clean_spaces,
                 escape, eog, to_id, specials)


def _array(meta: Mapping[str, Any], key: str, n: int, types: tuple, where: str) -> list | None:
    v = meta.get("tokenizer.ggml." + key)
    if v is None:
        return None
    allowed = set(types) | ({bool} if int in types else set())  # isinstance's view: a bool is an int
    if not isinstance(v, list) or len(v) < n or not set(map(type, v[:n])) <= allowed:
        raise FormatError(f"{where}: `tokenizer.ggml.{key}` must be a list of at least {n} numbers (one per token)")
    return v[:n]


def _merges(meta: Mapping[str, Any], where: str) -> dict[str, int]:
    raw = meta.get("tokenizer.ggml.merges")
    if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
        raise FormatError(f"{where}: a BPE vocabulary needs `tokenizer.ggml.merges`, a list of strings")
    ranks: dict[str, int] = {}
    for i, m in enumerate(raw):
        # llama.cpp splits at the first space after the first character; a line without one pairs "" with "",
        # so it can never apply: keep the line as its own key, which no pair lookup can form
        ranks.setdefault(m, i)
    return ranks


def _end_of_generation(tokens: list[str], attrs: list[int], to_id: dict[str, int],
                       ids: dict[str, int | None]) -> frozenset[int]:
    """llama.cpp's end-of-generation set (and the control attribute it forces on the tokens it finds by text)."""
    for k, texts in _BY_TEXT.items():
        if ids[k] is None:
            found = sorted(to_id[t] for t in texts if t in to_id)
            if found:
                ids[k] = found[0]
                attrs[found[0]] |= CONTROL
    for i, a in enumerate(attrs):
        if a & CONTROL and "unused" in tokens[i]:
            attrs[i] |= UNUSED
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
    for t in _EOG_TEXTS:
        if t in to_id:
            eog.add(to_id[t])
            attrs[to_id[t]] |= CONTROL
    for t in _ALWAYS_RENDERED:
        if t in to_id:
            attrs[to_id[t]] = USER_DEFINED
    eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
    texts = {tokens[i]: i for i in eog}
    if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                               or (("<|call|>" in texts or "<|calls|>" in texts) and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])  # gpt-oss / solar-open: <|end|> ends a message, not the generation
        attrs[texts["<|end|>"]] = USER_DEFINED
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(texts["</s>"])  # gemma 4 / plamo: </s> is an ordinary token
        attrs[texts["</s>"]] = NORMAL
    return frozenset(eog)


def _strip_rules(meta: Mapping[str, Any], tokens: list[str], attrs: list[int], to_id: dict[str, int],
                 specials: list[int]) -> None:
    """llama.cpp's per-model attributes: which specials swallow the white space beside them."""
    pre = str(meta.get("tokenizer.ggml.pre") or "")
    arch = str(meta.get("general.architecture") or "")
    name = str(meta.get("general.name") or "").lower()

    def mark(text: str, attr: int, on: bool = True) -> None:
        if text in to_id:
            i = to_id[text]
            attrs[i] = attrs[i] | attr if on else attrs[i] & ~attr

    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
            any(s in arch for s in ("nomic-bert-moe", "jina-bert-v3")):
        mark("<mask>", LSTRIP)
    elif "phi-3" in name or "phi3" in name:
        for i in specials:
            attrs[i] |= RSTRIP
        mark("</s>", RSTRIP)
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            mark(t, RSTRIP, on=False)
    elif "modern-bert" in name:
        mark("[MASK]", LSTRIP)
