"""The Python API: ``qadapt.load(...)`` returns a :class:`Model`.

Everything the CLI and the server do goes through here.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .errors import InputError, QadaptError
from .layer_maps import LayerMap
from .models.config import ModelConfig
from .models.decoder import Decoder
from .quant import native
from .runtime.generate import Generation, SamplingParams, run_generation
from .runtime.kv_cache import KVCache
from .tokenizer import IdsOnly, Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.lora import LoraAdapter

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
        self.device = torch.device("cpu")  # where the weights and the KV cache live (qadapt.device.place)
        self._slots: Any = None  # adapters.slots.SlotBank once placed for the device kernels
        self._graphs: Any = None  # runtime.graphs.DecodeGraphs on a GPU

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
    def _context(self, active: tuple[str, ...] | None = None, rows: tuple[tuple[str, ...], ...] | None = None,
                 alora: tuple[dict[str, int | None] | None, ...] | None = None,
                 ids: torch.Tensor | None = None) -> Any:
        """Per-forward adapter context (None: base model only): ``active`` for every row, or ``rows``' own
        adapter names per batch row. Merged adapters are in the weights already and never applied again.
        aLoRA adapters start at ``alora``'s positions per row (their invocation in the prompt), else where
        their invocation occurs in ``ids`` (a whole-sequence forward, PEFT's rule)."""
        from .adapters.lora import AdapterContext

        if self._slots is not None:
            from .device import slot_context

            return slot_context(self, active, rows, alora, ids)
        if rows is not None and any(r != rows[0] for r in rows):
            per_row = tuple(tuple(n for n in r if n not in self._merged) for r in rows)
            return AdapterContext(rows=per_row, alora=self._alora_starts(per_row, alora, ids))
        if rows is not None:
            active = rows[0]
        names = tuple(n for n in (self._active if active is None else active) if n not in self._merged)
        if not names:
            return None
        batch = ids.shape[0] if ids is not None else len(alora) if alora is not None else 1
        return AdapterContext(active=names, alora=self._alora_starts((names,) * batch, alora, ids))

    def _alora_starts(self, rows, given, ids) -> dict[str, torch.Tensor]:
        never = torch.iinfo(torch.long).max
        out: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(n for r in rows for n in r):
            a = self.adapters.get(name)
            if a is None or a.alora is None:
                continue
            starts = []
            for i, r in enumerate(rows):
                if given is not None and given[i] is not None and name in given[i]:
                    s = given[i][name]
                else:
                    s = a.alora_start(ids[i].tolist()) if ids is not None and name in r else None
                starts.append(never if s is None else s)
            out[name] = torch.tensor(starts, dtype=torch.long)
        return out

    def alora_starts(self, names: tuple[str, ...], prompt_ids: list[int]) -> dict[str, int | None]:
        """Where each aLoRA adapter among ``names`` starts in a prompt (for :meth:`step`'s ``alora``)."""
        return {n: self.adapters[n].alora_start(prompt_ids) for n in names
                if n in self.adapters and self.adapters[n].alora is not None}

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
        if spec.per_expert:
            from .layer_maps import expert_of

            e = expert_of(path, spec)
            if e is None or e >= self.config.num_experts:
                raise InputError(f"{path}: this {self.architecture} base has {self.config.num_experts} experts")
            return self.decoder.blocks[idx].experts[e], spec.role
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
        self.add_adapter(adapter)
        log.info("loaded adapter %s from %s: %d layers, %.1f KiB", name, source, len(adapter.factors),
                 adapter.nbytes / 1024)
        if activate:
            self.activate_adapters(self._active + (name,))

    def add_adapter(self, adapter: "LoraAdapter") -> None:
        """Attach a built adapter (:func:`qadapt.adapters.loading.build_adapter`, a mix from
        :func:`qadapt.adapters.mix.mix`) under its name; inactive."""
        from .adapters.attach import attach

        if adapter.name in self.adapters:
            raise InputError(f"an adapter named `{adapter.name}` is already loaded; unload it first")
        if self._slots is not None:
            from .device import on_device

            adapter = on_device(self, adapter)
        with self.lock:
            attach(self, adapter)
            self.adapters[adapter.name] = adapter
        native.trim_heap()

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
            if hasattr(self.decoder.embed, "parts"):
                self.decoder.embed.remove(name)
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
        ids = self._check_ids(input_ids).to(self.device)
        if self._xlora is not None:  # scaling pass + classifier, then the real pass
            return self.decoder(ids, ctx=self._xlora.context(self.decoder, ids)).logits.cpu()
        return self.decoder(ids, ctx=self._context(ids=ids)).logits.cpu()

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
        shape = (c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)
        cache = KVCache(*shape, device=self.device)
        if self._xlora is not None:  # the scaling pass keeps its own cache; non-granular state per row
            from .adapters.xlora import XLoraCache

            return XLoraCache(cache, KVCache(*shape, device=self.device))
        return cache

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any,
             rows: tuple[tuple[str, ...], ...] | None = None,
             alora: tuple[dict[str, int | None] | None, ...] | None = None) -> torch.Tensor:
        """The one forward every generation runs: ``ids`` [B, T] at ``positions`` [B, T] into ``cache``; the
        last position's logits [B, V]. ``rows``: each batch row's adapter names (the server's mixed batches;
        None: the active adapters). ``alora``: per row, where its aLoRA adapters start (:meth:`alora_starts` of
        its prompt; without it, where their invocation occurs in ``ids``). Merged adapters are not applied
        twice; X-LoRA runs its scaling pass and classifier. Holds :attr:`lock`, so adapter changes wait for
        the step to end. On an accelerator the logits come back to the host (sampling runs there); there a
        one-token step replays a CUDA graph where it can (:mod:`qadapt.runtime.graphs`)."""
        pos_host = positions
        ids, positions = ids.to(self.device), positions.to(self.device)
        with self.lock:
            if self._xlora is not None:
                if rows is not None and any(r != self._xlora.order for r in rows):
                    from .adapters.xlora import unsupported_with_xlora

                    raise unsupported_with_xlora("choosing adapters per row")
                ctx = self._xlora.context(self.decoder, ids, positions, cache)
                return self.decoder(ids, positions, cache.real, ctx=ctx, last_only=True).logits[:, -1].cpu()
            ctx = self._context(rows=rows, alora=alora, ids=ids)
            graphs = self._graphs
            if graphs is not None and graphs.usable(ids, cache, ctx):
                if int(pos_host.max()) >= cache.max_len:
                    raise QadaptError(f"sequence of {int(pos_host.max()) + 1} tokens exceeds the cache of "
                                      f"{cache.max_len} (the context length)")
                return graphs.step(ids, positions, cache, ctx).cpu()
            return self.decoder(ids, positions, cache, ctx=ctx, last_only=True).logits[:, -1].cpu()

    @torch.inference_mode()
    def score_step(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any,
                   rows: tuple[tuple[str, ...], ...] | None = None, top: int = 0,
                   alora: tuple[dict[str, int | None] | None, ...] | None = None):
        """:meth:`step` that also scores its input (a prompt's log-probabilities): the last logits [B, V] and
        (logprob of each next input token [B, T-1], the ``top`` most likely log-probabilities and ids
        [B, T-1, top]). Not with X-LoRA."""
        ids, positions = ids.to(self.device), positions.to(self.device)
        with self.lock:
            if self._xlora is not None:
                from .adapters.xlora import unsupported_with_xlora

                raise unsupported_with_xlora("scoring a prompt")
            ctx = self._context(rows=rows, alora=alora, ids=ids)
            out = self.decoder(ids, positions, cache, ctx=ctx, last_only=True, score=top)
            return out.logits[:, -1].cpu(), tuple(t.cpu() for t in out.scores)

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

    def encode_chat(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                    **template_vars: Any) -> list[int]:
        """The ids of ``messages`` rendered by the chat template (``chat_template``, else the one given to
        :func:`load`, else the model's), as transformers' ``apply_chat_template(..., add_generation_prompt=True)``;
        ``template_vars`` (``tools=[...]``, ``enable_thinking=False``) reach the template as its variables."""
        ids = self._tokenizer().encode_chat(messages, chat_template or self.chat_template, **template_vars)
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
        *,
        typical_p: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        ignore_eos: bool = False,
        json_schema: dict | str | None = None,
        regex: str | None = None,
        grammar: str | None = None,
    ) -> Generation | Iterator[str]:
        """Generate from a text or token-id prompt; greedy unless ``temperature > 0``.

        Returns a :class:`Generation` (``.text``, ``.token_ids`` of the new tokens, ``.seed``), or an
        iterator of text pieces when ``stream=True``. ``json_schema`` / ``regex`` / ``grammar`` (Lark)
        constrain the output (:mod:`qadapt.runtime.constrain`; ``json_schema={}`` asks for any JSON object).
        """
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            self._check_ids(torch.tensor(ids))
        tok = self.tokenizer or IdsOnly(self.config.eos_token_ids)
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, tuple(stop),
                                typical_p=typical_p, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, logit_bias=tuple((logit_bias or {}).items()),
                                ignore_eos=ignore_eos, grammar=self._grammar(json_schema, regex, grammar))
        step = self.step
        starts = self.alora_starts(self._active, ids)
        if starts:  # aLoRA: from the invocation in the prompt on, through every generated token
            step = functools.partial(self.step, alora=(starts,))
        return run_generation(step, self.new_cache, ids, params, tok, self.config.context_length, stream)

    def _grammar(self, json_schema, regex, grammar):
        from .runtime.constrain import Constraint, compile_constraint

        given = [(k, v) for k, v in (("json_schema", json_schema), ("regex", regex), ("lark", grammar)) if v is not None]
        if not given:
            return None
        if len(given) > 1:
            raise InputError("give at most one of json_schema, regex and grammar")
        kind, value = given[0]
        if kind == "json_schema" and value == {}:
            kind = "json_object"
        return compile_constraint(self._tokenizer(), Constraint(kind, value), self.config.vocab_size)

    # ------------------------------------------------------------------ introspection
    def targetable_layers(self) -> list[str]:
        return [r.path for r in self.layer_map.modules(self.config.shapes)]

    def memory_bytes(self) -> int:
        from .models.build import model_bytes

        return model_bytes(self.decoder)

    def __repr__(self) -> str:
        return f"Model({self.architecture}, {self.source}, mode={self.mode}, format={self.base_format})"
