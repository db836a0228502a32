"""The Python API: ``qadapt.load(...)`` returns a :class:`Model`.

Everything the CLI and the server do goes through here.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InputError, SourceError
from .layer_maps import LayerMap
from .models.config import ModelConfig
from .models.decoder import Decoder
from .quant import native
from .runtime.generate import Generation, SamplingParams, run_generation
from .runtime.kv_cache import KVCache
from .tokenizer import IdsOnly, Tokenizer

log = logging.getLogger(__name__)

MODES = ("inplace", "dequantize")


class Model:
    """A loaded base model (and, once loaded, its adapters)."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer | None, layer_map: LayerMap, source: str,
                 mode: str, base_format: str, file_info: dict[str, Any] | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.layer_map = layer_map
        self.source = source
        self.mode = mode
        self.base_format = base_format  # "gguf" | "full" | "gptq" | "bnb"
        self.file_info = file_info or {}
        self.adapters: dict[str, Any] = {}  # name -> LoraAdapter
        self._active: tuple[str, ...] = ()
        self._merged: tuple[str, ...] = ()
        self._xlora: Any = None  # adapters.xlora.XLora once an X-LoRA checkpoint is loaded
        self.chat_template: str | None = None  # overrides the tokenizer's (load(..., chat_template=...))
        # held by every forward and by every change of the adapters: a change lands between two steps,
        # never inside one (the server changes adapters from request threads while its engine decodes)
        self.lock = threading.RLock()

    @property
    def config(self) -> ModelConfig:
        return self.decoder.cfg

    @property
    def base_format_quant(self) -> str | None:
        """A ``--quant`` value describing the base (for the layer-map support tables)."""
        if self.base_format == "gguf":
            types = [t for t in self.file_info.get("types", {}) if t not in ("F32", "F16", "BF16")]
            return types[0] if types else None
        if self.base_format in ("gptq", "bnb"):
            return self.file_info.get("quant")
        return None

    @property
    def architecture(self) -> str:
        return self.layer_map.architecture

    # ------------------------------------------------------------------ forward
    def _context(self, active: tuple[str, ...] | None = None,
                 rows: tuple[tuple[str, ...], ...] | None = None) -> Any:
        """Per-forward adapter context (None: base model only): ``active`` for every row, or ``rows``' own
        adapter names per batch row. Merged adapters are in the weights already and never applied again."""
        from .adapters.lora import AdapterContext

        if rows is not None and any(r != rows[0] for r in rows):
            return AdapterContext(rows=tuple(tuple(n for n in r if n not in self._merged) for r in rows))
        if rows is not None:
            active = rows[0]
        names = tuple(n for n in (self._active if active is None else active) if n not in self._merged)
        return AdapterContext(active=names) if names else None

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> tuple[str, ...]:
        return self._active

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        """Adapters folded into the weights (:meth:`merge_adapters`)."""
        return self._merged

    @property
    def xlora(self) -> bool:
        """Whether an X-LoRA checkpoint drives this model's adapters."""
        return self._xlora is not None

    def _slot(self, path: str):
        """(container, key) holding the linear at a module path."""
        hit = self.layer_map.match_path(path)
        if hit is None:
            raise InputError(f"{path} is not a targetable layer of {self.architecture}")
        spec, idx = hit
        if idx is None:
            return self.decoder, "lm_head"
        return self.decoder.blocks[idx].linears, spec.role

    def _wrapper(self, path: str):
        from .adapters.lora import LoraLinear

        container, key = self._slot(path)
        cur = container[key] if isinstance(container, torch.nn.ModuleDict) else getattr(container, key)
        if isinstance(cur, LoraLinear):
            return cur
        wrapped = LoraLinear(cur, path)
        if isinstance(container, torch.nn.ModuleDict):
            container[key] = wrapped
        else:
            setattr(container, key, wrapped)
        return wrapped

    def _wrappers(self):
        from .adapters.lora import LoraLinear

        return [m for m in self.decoder.modules() if isinstance(m, LoraLinear)]

    def load_adapter(self, name: str, source: str | os.PathLike, adapter_source: str | None = None, *,
                     activate: bool = False, subfolder: str | None = None, revision: str | None = None,
                     strict: bool = False) -> None:
        """Load a PEFT LoRA adapter (local folder, Hub id or s3:// URL) under ``name``; inactive unless ``activate``.

        ``strict`` refuses adapters with NaN/Inf weights (otherwise a warning)."""
        from .adapters.loading import build_adapter
        from .adapters.sources import resolve_adapter

        if name in self.adapters:
            raise InputError(f"an adapter named `{name}` is already loaded; unload it first")
        folder = resolve_adapter(str(source), adapter_source, subfolder=subfolder, revision=revision)
        adapter = build_adapter(name, str(source), folder, self.layer_map, self.config.shapes, self.base_format,
                                base_id=self.source, strict=strict)
        with self.lock:
            for path, f in adapter.factors.items():
                self._wrapper(path).add(name, f)
            self.adapters[name] = adapter
        native.trim_heap()
        log.info("loaded adapter %s from %s: %d layers, %.1f KiB", name, source, len(adapter.factors),
                 adapter.nbytes / 1024)
        if activate:
            self.activate_adapters(self._active + (name,))

    def unload_adapter(self, name: str) -> None:
        if self._xlora is not None and name in self._xlora.order:
            raise InputError(f"adapter `{name}` is an X-LoRA expert; its classifier needs every expert loaded")
        if name not in self.adapters:
            raise InputError(f"no adapter named `{name}` is loaded (loaded: {', '.join(self.adapters) or 'none'})")
        if name in self._merged:
            raise InputError(f"adapter `{name}` is merged; call unmerge_adapters() first")
        with self.lock:
            for w in self._wrappers():
                w.remove(name)
            del self.adapters[name]
            self._active = tuple(n for n in self._active if n != name)

    def activate_adapters(self, names: list[str] | tuple[str, ...]) -> None:
        """Make exactly ``names`` active (``[]`` = base model only). Costs no copies."""
        names = tuple(dict.fromkeys(names))
        if self._xlora is not None and names != self._xlora.order:
            from .adapters.xlora import unsupported_with_xlora

            raise unsupported_with_xlora("choosing active adapters")
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise InputError(f"unknown adapter(s) {', '.join(unknown)}; loaded: {', '.join(self.adapters) or 'none'}")
        if self._merged and set(self._merged) - set(names):
            raise InputError(f"adapters {', '.join(self._merged)} are merged; call unmerge_adapters() first")
        self._active = names

    def merge_adapters(self) -> None:
        """Fold the active adapters into the dense weights (dequantize mode); ``unmerge_adapters`` restores them."""
        if self.mode != "dequantize":
            raise InputError("merging needs mode='dequantize' (in place, the base weights stay quantized)")
        if self._xlora is not None:
            from .adapters.xlora import unsupported_with_xlora

            raise unsupported_with_xlora("merging (the scalings change per token)")
        with self.lock:
            self.unmerge_adapters()
            for w in self._wrappers():
                w.merge(self._active)
            self._merged = self._active

    def unmerge_adapters(self) -> None:
        with self.lock:
            for w in self._wrappers():
                w.unmerge()
            self._merged = ()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without cache: LongTensor [batch, seq] -> float32 [batch, seq, vocab]."""
        ids = self._check_ids(input_ids)
        if self._xlora is not None:  # scaling pass + classifier, then the real pass
            return self.decoder(ids, ctx=self._xlora.context(self.decoder, ids)).logits
        return self.decoder(ids, ctx=self._context()).logits

    def xlora_scalings(self) -> torch.Tensor | None:
        """The last X-LoRA scalings, float32 [batch, seq, n_layers or 1, n_adapters] (after softmax, before
        top-k); None before the first forward or without X-LoRA."""
        return None if self._xlora is None else self._xlora.last_scalings

    def _check_ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise InputError(f"token ids must be in [0, {self.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        if ids.shape[1] > self.config.context_length:
            raise InputError(f"{ids.shape[1]} tokens exceed the context length {self.config.context_length}")
        return ids

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        c = self.config
        cache = KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        if self._xlora is not None:  # the scaling pass keeps its own cache; non-granular state per row
            from .adapters.xlora import XLoraCache

            return XLoraCache(cache, KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim))
        return cache

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any,
             rows: tuple[tuple[str, ...], ...] | None = None) -> torch.Tensor:
        """The one forward every generation runs: ``ids`` [B, T] at ``positions`` [B, T] into ``cache``; the
        last position's logits [B, V]. ``rows``: each batch row's adapter names (the server's mixed batches;
        None: the active adapters). Merged adapters are not applied twice; X-LoRA runs its scaling pass and
        classifier. Holds :attr:`lock`, so adapter changes wait for the step to end."""
        with self.lock:
            if self._xlora is not None:
                if rows is not None and any(r != self._xlora.order for r in rows):
                    from .adapters.xlora import unsupported_with_xlora

                    raise unsupported_with_xlora("choosing adapters per row")
                ctx = self._xlora.context(self.decoder, ids, positions, cache)
                return self.decoder(ids, positions, cache.real, ctx=ctx, last_only=True).logits[:, -1]
            ctx = self._context(rows=rows)
            return self.decoder(ids, positions, cache, ctx=ctx, last_only=True).logits[:, -1]

    # ------------------------------------------------------------------ text
    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError(f"{self.source} has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def _fits_vocab(self, ids: list[int], what: str) -> list[int]:
        """``ids`` from the tokenizer, refused by name where one falls outside the model's embedding (a
        tokenizer may hold more tokens than the model has rows: an added token typed in the text)."""
        n = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            text = self.tokenizer.decode([bad[0]], skip_special=False) if self.tokenizer else ""
            raise InputError(f"{what} holds token {bad[0]} ({text!r}), outside the model's vocabulary of {n} "
                             "(the tokenizer has tokens the model's embedding lacks)")
        return ids

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Prompt ids as the model's tokenizer gives them (BOS where it adds one; special-token text parsed,
        as llama.cpp's server and transformers do), checked against the model's vocabulary."""
        return self._fits_vocab(self._tokenizer().encode(text, add_special, parse_special), "the prompt")

    def encode_chat(self, messages: list[dict[str, Any]], chat_template: str | None = None) -> list[int]:
        """The ids of ``messages`` rendered by the chat template (``chat_template``, else the one given to
        :func:`load`, else the model's), as transformers' ``apply_chat_template(..., add_generation_prompt=True)``."""
        ids = self._tokenizer().encode_chat(messages, chat_template or self.chat_template)
        return self._fits_vocab(ids, "the chat")

    def chat(self, messages: list[dict[str, Any]], *, chat_template: str | None = None,
             **kwargs: Any) -> Generation | Iterator[str]:
        """:meth:`generate` on the rendered chat (``messages``: ``[{"role": ..., "content": ...}, ...]``)."""
        return self.generate(self.encode_chat(messages, chat_template), **kwargs)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
        stream: bool = False,
    ) -> Generation | Iterator[str]:
        """Generate from a text or token-id prompt; greedy unless ``temperature > 0``.

        Returns a :class:`Generation` (``.text``, ``.token_ids`` of the new tokens), or an
        iterator of text pieces when ``stream=True``.
        """
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            self._check_ids(torch.tensor(ids))
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, tuple(stop))
        tok = self.tokenizer or IdsOnly(self.config.eos_token_ids)
        return run_generation(self.step, self.new_cache, ids, params, tok, self.config.context_length, stream)

    # ------------------------------------------------------------------ introspection
    def targetable_layers(self) -> list[str]:
        return [r.path for r in self.layer_map.enumerate_modules(self.config.num_hidden_layers)]

    def memory_bytes(self) -> int:
        from .models.build import model_bytes

        return model_bytes(self.decoder)

    def __repr__(self) -> str:
        return f"Model({self.architecture}, {self.source}, mode={self.mode}, format={self.base_format})"


def _resolve_model_path(path_or_id: str | os.PathLike, gguf_file: str | None, revision: str | None) -> Path:
    p = Path(path_or_id)
    if p.exists():
        if p.is_dir() and gguf_file:
            p = p / gguf_file
        return p
    s = str(path_or_id)
    if gguf_file is None:
        if s.count("/") == 1 and not s.startswith((".", "/")):
            return _download_hf_checkpoint(s, revision)
        raise InputError(f"model {s} does not exist")
    from .hub import download

    return download(s, filename=gguf_file, revision=revision, what=f"GGUF file `{gguf_file}` of Hub repo `{s}`")


#: What a transformers checkpoint needs: config, weights, tokenizer (no .bin, no other formats).
_HF_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer*", "vocab.*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.tiktoken"]


def _download_hf_checkpoint(repo: str, revision: str | None) -> Path:
    """A Hub transformers repo (config.json + safetensors + tokenizer) through huggingface_hub's cache."""
    from .hub import download

    folder = download(repo, allow_patterns=_HF_PATTERNS, revision=revision, what=f"Hub model `{repo}`")
    if not (folder / "config.json").is_file():
        raise SourceError(f"{repo} has no config.json: not a transformers checkpoint; for a GGUF repo pass the "
                          "file name (--gguf-file NAME / gguf_file=NAME)")
    return folder


def load(
    path_or_id: str | os.PathLike,
    *,
    mode: str = "inplace",
    dtype: torch.dtype | str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    adapters: dict[str, str] | None = None,
    ordering: str | os.PathLike | None = None,
    adapter_model_id: str | None = None,
    activate: list[str] | None = None,
    merge: bool = False,
    xlora: str | os.PathLike | None = None,
    tgt_non_granular_index: int | None = None,
    quant: str | None = None,
    double_quant: bool = False,
    kernels: str = "exact",
    chat_template: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Model:
    """Load a base model: a GGUF file (local, or ``org/repo`` + ``gguf_file`` on the Hub).

    ``mode="inplace"`` keeps quantized weights in their bytes and multiplies on them;
    ``mode="dequantize"`` expands them to ``dtype`` (float32 by default) on load.

    Adapters: ``adapters={name: source}`` (local folder, Hub id or ``s3://``; all active unless
    ``activate`` names a subset), or an ordering file (mistral.rs format) whose ``order`` names are
    sub-folders of ``adapter_model_id`` (active at start) and whose ``preload_adapters`` load
    inactive. ``merge=True`` (dequantize mode) folds the active adapters into the weights.

    X-LoRA: ``xlora=SOURCE`` (X-LoRA / mistral.rs layout or PEFT's, adapters in sub-folders, or in
    ``adapter_model_id``); the ordering, if given, must list the training order and each module's
    classifier row. ``tgt_non_granular_index=k`` freezes each sequence's scalings after k generated tokens.

    A transformers folder or Hub id (``config.json`` + safetensors) loads full precision, or, with
    ``quant="Q4_0"`` / ``"Q8_0"`` / ..., quantized in situ into the GGUF layers, or with
    ``quant="nf4"`` / ``"fp4"`` / ``"int8"`` through bitsandbytes (``double_quant=True``: nested
    absmax quantization; ``dtype``: the 4-bit compute dtype). GPTQ and bitsandbytes folders load
    as saved.

    ``kernels="q8"`` (in place, GGUF types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL/Q4_K/Q5_K/Q6_K, CPUs with
    AVX2) computes as llama.cpp does: activations quantized to 8 bits per block of 32, integer dot
    products; several times faster, with an activation-rounding error (bounded, see
    ``qadapt/quant/native/ggml_kernels.c``) that ``kernels="exact"`` (the default) does not have.

    ``chat_template``: a Jinja chat template (a string, or a ``.jinja`` / ``tokenizer_config.json`` file) used
    by :meth:`Model.chat` instead of the model's own; a model with neither refuses chat.
    """
    from .models.loader import load_base

    if kwargs:
        raise InputError(f"unknown argument(s) to qadapt.load: {', '.join(sorted(kwargs))}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    from .quant.kernels import check_kernels

    check_kernels(kernels)
    if kernels == "q8" and mode != "inplace":
        raise InputError("kernels='q8' (--kernels q8) runs quantized weights in place; with mode='dequantize' "
                         "the weights are dense float and take the exact kernels: drop one of the two")
    path = _resolve_model_path(path_or_id, gguf_file, revision)
    base = load_base(path, mode=mode, dtype=_dtype(dtype), quant=quant, double_quant=double_quant, kernels=kernels)
    if kernels == "q8":
        _use_native_ops(base.decoder)
    model = Model(base.decoder, base.tokenizer, base.layer_map, str(path), mode, base.base_format, base.info)
    if chat_template is not None:
        model.chat_template = _chat_template(chat_template)
    if xlora is not None:
        _attach_xlora(model, xlora, ordering, adapter_model_id, tgt_non_granular_index, adapters, activate, merge)
        native.trim_heap()
        return model
    if tgt_non_granular_index is not None:
        raise InputError("tgt_non_granular_index applies to X-LoRA only (pass xlora=SOURCE)")
    _attach_adapters(model, adapters, ordering, adapter_model_id, activate)
    if merge:
        model.merge_adapters()
    native.trim_heap()
    return model


def _chat_template(value: str | os.PathLike) -> str:
    """A template given as a file path (``.jinja``, ``.json``) or as the template text itself."""
    from .tokenizer import read_template

    text = str(value)
    if "{{" in text or "{%" in text:
        return text
    return read_template(value)  # a path: a clear error when it does not exist


def _use_native_ops(decoder: Decoder) -> None:
    from .quant import native

    lib = native.library()
    if lib is None:
        log.warning("kernels='q8': the native kernels are unavailable (no C compiler, or QADAPT_NATIVE=0); "
                    "running the exact kernels")
    elif not lib.simd:
        log.warning("kernels='q8' needs AVX2; this CPU runs the exact kernels")
    else:
        from .models import native as native_decode

        native_decode.apply(decoder, lib)


def _attach_adapters(model: Model, adapters, ordering, adapter_model_id, activate) -> None:
    start: list[str] = []
    for name, src in (adapters or {}).items():
        model.load_adapter(name, src)
        start.append(name)
    if ordering is not None:
        from .ordering import read_ordering

        o = read_ordering(ordering)
        _check_ordering(model, ordering)
        if o.order and adapter_model_id is None:
            raise InputError(f"ordering {ordering} names adapters {list(o.order)}: pass adapter_model_id "
                             "(the folder, Hub id or s3:// URL holding one sub-folder per name)")
        for name in o.order or ():
            model.load_adapter(name, adapter_model_id, subfolder=name)
            start.append(name)
        for p in o.preload_adapters:
            model.load_adapter(p.name, p.adapter_model_id)
    elif adapter_model_id is not None:
        raise InputError("adapter_model_id is given without an ordering file")
    model.activate_adapters(start if activate is None else activate)


def _attach_xlora(model: Model, source, ordering, adapter_model_id, tgt, adapters, activate, merge) -> None:
    from .adapters.xlora import load_xlora, unsupported_with_xlora
    from .ordering import read_ordering

    for given, what in ((adapters, "adapters="), (activate is not None, "activate="), (merge, "merge=True")):
        if given:
            raise unsupported_with_xlora(what)
    o = None
    if ordering is not None:
        o = read_ordering(ordering)
        _check_ordering(model, ordering)
        if o.preload_adapters:
            log.warning("ordering %s: preload_adapters are ignored with X-LoRA", ordering)
    model._xlora = load_xlora(model, str(source), o, tgt, adapter_model_id)
    model._active = model._xlora.order


def _check_ordering(model: Model, ordering) -> None:
    """The ordering's own rules against this base (what ``qadapt check`` reports), before loading adapters."""
    from .check import check_ordering

    report = check_ordering(ordering, model=model.source, quant=model.base_format_quant, offline=True)
    if report.problems:
        from .errors import AdapterError

        lines = "\n  - ".join(p.message for p in report.problems)
        raise AdapterError(f"ordering {ordering} does not fit this base:\n  - {lines}")


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise InputError(f"dtype must be one of {sorted(table)}, got {dtype!r}") from None
