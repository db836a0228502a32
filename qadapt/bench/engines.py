"""The engines under test, each behind the same five operations.

Every engine runs the same greedy loop shape: one prefill forward over the prompt
(logits of the last position only), then one forward per new token, argmax, no
sampling machinery and no stop conditions (the model's EOS logit is pinned to 0, see
:func:`qadapt.bench.make.random_state_dict`), so what is timed is the engine's forward.

- :class:`QadaptEngine`: ``qadapt.load`` (``inplace``, ``q8`` = in place with ``kernels="q8"``, or ``dequantize``), its decoder and KV cache,
  adapters through ``Model.load_adapter`` / ``activate_adapters`` and, for the batch of rows on
  different adapters, an ``AdapterContext(rows=...)``.
- :class:`QadaptXLoraEngine`: ``qadapt.load(..., xlora=...)`` with the bench's X-LoRA checkpoint;
  decode through the model's own generation step (scaling pass + classifier + real pass), with
  granular scalings or frozen ones (``tgt_non_granular_index``).
- :class:`LlamaCppEngine`: llama-cpp-python on the same GGUF, adapters through llama.cpp's
  LoRA API (``llama_adapter_lora_init`` + per-context adapter scales).
- :class:`HFEngine`: transformers (bf16, or bitsandbytes nf4) + PEFT; mixed-adapter batches
  through PEFT's ``adapter_names``.
- ``MistralRsEngine`` (:mod:`.mistralrs_engine`): mistral.rs on the same GGUF, for ``big`` (not in the
  default engine set).
"""

from __future__ import annotations

import ctypes
import importlib
import gc
import time
from pathlib import Path
from typing import Any, Sequence

import torch


class Unsupported(Exception):
    """An engine cannot do this measurement (reported as skipped, with this message)."""


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().argmax(-1)


class Engine:
    """Base: ``load`` (timed: the base model), ``add_adapter``, ``prefill_decode``, ``switch``, ``batched``."""

    def __init__(self, threads: int):
        self.threads = threads
        torch.set_num_threads(threads)

    def load(self) -> None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Import what ``load`` uses, so the worker's baseline memory holds the libraries, not the model."""
        for module in self.libraries:
            importlib.import_module(module)

    #: modules ``load`` imports (see :meth:`prepare`)
    libraries: tuple[str, ...] = ()

    def unload(self) -> None:
        gc.collect()

    def add_adapter(self, name: str, folder: Path, lora_gguf: Path) -> None:
        raise NotImplementedError

    def prefill_decode(self, prompt: list[int], n: int, adapters: Sequence[str]) -> tuple[float, float]:
        """Seconds for the prefill of ``prompt`` and for the next ``n`` greedy decode steps."""
        raise NotImplementedError

    def switch(self, name: str) -> None:
        """Make exactly ``[name]`` the active adapter."""
        raise NotImplementedError

    def batched(self, prompts: list[list[int]], n: int, adapters: list[str]) -> float:
        """Seconds for ``n`` decode steps of ``len(prompts)`` rows, row i on adapter ``adapters[i]``."""
        raise Unsupported(f"{type(self).__name__} cannot batch sequences on different adapters")

    def weight_bytes(self) -> int | None:
        """Bytes of weights a decode step reads, when the engine's own layout decides it (else None)."""
        return None


def _load_kwargs(mode: str) -> dict[str, str]:
    """The bench's qadapt mode as ``qadapt.load`` arguments: ``q8`` is what ``qadapt.load(path)`` picks by
    default (in place, ``kernels="auto"``); ``inplace`` the exact kernels, named."""
    if mode == "q8":
        return {"mode": "inplace", "kernels": "auto"}
    return {"mode": "inplace", "kernels": "exact"} if mode == "inplace" else {"mode": mode}


class QadaptEngine(Engine):
    # GGUF tokenizers are built by transformers' converter (qadapt.tokenizer; the auto tokenizer where it moved)
    libraries = ("qadapt", "transformers.models.auto.tokenization_auto",
                 "transformers.integrations.gguf.gguf_tokenizer_mapping")

    def __init__(self, path: Path, mode: str, threads: int):
        super().__init__(threads)
        self.path, self.mode = path, mode
        self.m = None

    def load(self) -> None:
        import qadapt

        self.m = qadapt.load(self.path, **_load_kwargs(self.mode))

    def unload(self) -> None:
        self.m = None
        super().unload()

    def add_adapter(self, name, folder, lora_gguf) -> None:
        self.m.load_adapter(name, folder)

    def _ctx(self, names: Sequence[str]):
        from ..adapters.lora import AdapterContext

        self.m.activate_adapters(list(names))
        return AdapterContext(active=tuple(names)) if names else None

    @torch.inference_mode()
    def prefill_decode(self, prompt, n, adapters):
        ctx = self._ctx(adapters)
        dec = self.m.decoder
        cache = self.m.new_cache(len(prompt) + n + 1)
        ids = torch.tensor([prompt])
        pos = torch.arange(len(prompt)).unsqueeze(0)
        t0 = time.perf_counter()
        tok = _argmax(dec(ids, pos, cache, ctx=ctx, last_only=True).logits[:, -1])
        t1 = time.perf_counter()
        p = len(prompt)
        for _ in range(n):
            tok = _argmax(dec(tok.view(1, 1), torch.tensor([[p]]), cache, ctx=ctx, last_only=True).logits[:, -1])
            p += 1
        return t1 - t0, time.perf_counter() - t1

    def switch(self, name):
        self.m.activate_adapters([name])

    @torch.inference_mode()
    def batched(self, prompts, n, adapters):
        from ..adapters.lora import AdapterContext

        ctx = AdapterContext(rows=tuple((a,) for a in adapters))
        dec = self.m.decoder
        B, T = len(prompts), len(prompts[0])
        cache = self.m.new_cache(T + n + 1, batch=B)
        pos = torch.arange(T).expand(B, T)
        tok = _argmax(dec(torch.tensor(prompts), pos, cache, ctx=ctx, last_only=True).logits[:, -1])
        t0 = time.perf_counter()
        for s in range(n):
            step = torch.full((B, 1), T + s)
            tok = _argmax(dec(tok.view(B, 1), step, cache, ctx=ctx, last_only=True).logits[:, -1])
        return time.perf_counter() - t0


class QadaptXLoraEngine(Engine):
    """qadapt with an X-LoRA checkpoint: its load (base + classifier + experts) and its decode."""
    libraries = QadaptEngine.libraries

    def __init__(self, path: Path, xlora: Path, mode: str, threads: int):
        super().__init__(threads)
        self.path, self.xlora, self.mode = path, xlora, mode
        self.m = None

    def load(self) -> None:
        import qadapt

        self.m = qadapt.load(self.path, xlora=self.xlora, **_load_kwargs(self.mode))

    def unload(self) -> None:
        self.m = None
        super().unload()

    @torch.inference_mode()
    def prefill_decode_xlora(self, prompt: list[int], n: int, non_granular_index: int | None
                             ) -> tuple[float, float, int]:
        """Seconds for the prefill and the ``n`` decode steps, and the scaling passes the decode ran.

        Each step is ``Model.step``, the step ``generate`` runs: the scaling pass (its own KV cache)
        and the classifier, unless this row's scalings are frozen, then the real pass.
        ``non_granular_index`` sets the loaded X-LoRA's ``tgt_non_granular_index`` (None: granular).
        """
        xl = self.m._xlora
        xl.tgt_non_granular_index = non_granular_index
        cache = self.m.new_cache(len(prompt) + n + 1)
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        tok = _argmax(self.m.step(ids, torch.arange(len(prompt)).unsqueeze(0), cache))
        t1 = time.perf_counter()
        passes = xl.scaling_passes
        p = len(prompt)
        for _ in range(n):
            tok = _argmax(self.m.step(tok.view(1, 1), torch.tensor([[p]]), cache))
            p += 1
        return t1 - t0, time.perf_counter() - t1, xl.scaling_passes - passes


def cpu_has_amx() -> bool:
    """Intel AMX (``amx_tile`` in /proc/cpuinfo's flags), where llama.cpp's AMX buffers crash (see below)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_tile" in line.split() for line in f)
    except OSError:
        return False


class LlamaCppEngine(Engine):
    libraries = ("llama_cpp",)

    def __init__(self, path: Path, threads: int, n_ctx: int = 512, n_batch: int | None = None):
        super().__init__(threads)
        self.path, self.n_ctx = path, n_ctx
        self.n_batch = n_batch or n_ctx  # long contexts: llama.cpp's default 512-token batches
        self.llm = None
        self.adapters: dict[str, Any] = {}

    def load(self) -> None:
        """llama.cpp's defaults, but on CPUs with AMX: ``use_extra_bufts=False`` there.

        llama-cpp-python 0.3.36 built with GGML_NATIVE on an AMX CPU (Xeon) segfaults in ``llama_decode``
        on Q8_0 / Q4_0 / Q4_K_M files with its AMX-repacked weight buffers (reproduced with the quick model,
        no adapters); its plain CPU buffers work. Elsewhere (AVX2: the CPU_REPACK buffers, e.g. Q4_0 as
        Q4_0_8x8) the defaults work with and without adapters, and they are llama.cpp's fast path, so they
        stay. ``Llama`` does not take the flag, so its default-params factory is wrapped while the model loads.
        """
        import llama_cpp
        from llama_cpp import Llama

        default = llama_cpp.llama_model_default_params
        self.extra_bufts = not cpu_has_amx()

        def params():
            p = default()
            p.use_extra_bufts = self.extra_bufts
            return p

        llama_cpp.llama_model_default_params = params
        try:
            self.llm = Llama(str(self.path), n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
                             n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
        finally:
            llama_cpp.llama_model_default_params = default

    def unload(self) -> None:
        import llama_cpp

        for a in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(a)
        self.adapters = {}
        if self.llm is not None:
            self.llm.close()
        self.llm = None
        super().unload()

    def add_adapter(self, name, folder, lora_gguf) -> None:
        import llama_cpp

        a = llama_cpp.llama_adapter_lora_init(self.llm.model, str(lora_gguf).encode())
        if not a:
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora_gguf}")
        self.adapters[name] = a

    def _set(self, names: Sequence[str], ctx=None) -> None:
        import llama_cpp

        ctx = ctx or self.llm.ctx
        if hasattr(llama_cpp, "llama_set_adapters_lora"):  # newer API: the whole set at once
            n = len(names)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[self.adapters[a] for a in names])
            scales = (ctypes.c_float * max(n, 1))(*([1.0] * n))
            if llama_cpp.llama_set_adapters_lora(ctx, arr, n, scales) != 0:
                raise RuntimeError(f"llama.cpp refused the adapter set {list(names)}")
            return
        llama_cpp.llama_clear_adapter_lora(ctx)
        for a in names:
            llama_cpp.llama_set_adapter_lora(ctx, self.adapters[a], 1.0)

    def last_logits(self):
        """The last evaluated position's logits (a view on llama.cpp's buffer)."""
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.llm.n_vocab(),))

    def _logits(self) -> int:
        return int(self.last_logits().argmax())

    def prefill_decode(self, prompt, n, adapters):
        self._set(adapters)
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self._logits()
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = self._logits()
        return t1 - t0, time.perf_counter() - t1

    def switch(self, name):
        self._set([name])

    def batched(self, prompts, n, adapters):
        return self.batched_tokens(prompts, n, adapters)[0]

    def batched_tokens(self, prompts: list[list[int]], n: int, adapters: list[str]) -> tuple[float, list[list[int]]]:
        """Seconds for ``n`` steps of all rows in one ``llama_decode`` each (one sequence id per row, in a context
        made for that many sequences, with the model context's settings), and each row's greedy tokens.

        llama.cpp applies one adapter set per context, so the rows must share theirs (the bench's
        "8 rows x 1 shared adapter")."""
        import llama_cpp
        import numpy as np

        if len(set(adapters)) > 1:
            raise Unsupported("llama.cpp applies one adapter set per context: it cannot batch sequences on "
                              "different adapters")
        B, T = len(prompts), len(prompts[0])
        cp = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        cp.n_seq_max = B
        cp.n_ctx = B * -(-(T + n + 1) // 256) * 256  # each sequence's own part of the cache, padded as llama.cpp pads
        cp.n_batch = cp.n_ubatch = B * T
        ctx = llama_cpp.llama_init_from_model(self.llm.model, cp)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {B} sequences")
        batch = llama_cpp.llama_batch_init(B * T, 0, B)
        nv = self.llm.n_vocab()

        def decode(items):  # (token, position, sequence, wants logits)
            batch.n_tokens = len(items)
            for i, (tok, pos, seq, out) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
                batch.seq_id[i][0] = seq
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on a batch of {len(items)} tokens")

        def argmax(rows):
            return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(nv,)).argmax())
                    for i in rows]

        try:
            self._set(adapters[:1], ctx)
            decode([(p[t], t, b, t == T - 1) for b, p in enumerate(prompts) for t in range(T)])
            tok = argmax([b * T + T - 1 for b in range(B)])
            out = [[t] for t in tok]
            t0 = time.perf_counter()
            for s in range(n):
                decode([(tok[b], T + s, b, True) for b in range(B)])
                tok = argmax(range(B))
                for b in range(B):
                    out[b].append(tok[b])
            return time.perf_counter() - t0, out
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)


class HFEngine(Engine):
    """transformers + PEFT; ``quant="nf4"`` loads the base through bitsandbytes 4-bit NF4."""
    libraries = ("transformers", "peft")

    def __init__(self, folder: Path, quant: str | None, threads: int):
        super().__init__(threads)
        self.folder, self.quant = folder, quant
        self.model = None
        self.pm = None

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {"dtype": torch.bfloat16}
        if self.quant == "nf4":
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
            kw["device_map"] = "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(str(self.folder), **kw).eval()

    def unload(self) -> None:
        self.model = self.pm = None
        super().unload()

    def add_adapter(self, name, folder, lora_gguf) -> None:
        from peft import PeftModel

        if self.pm is None:
            self.pm = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name).eval()
        else:
            self.pm.load_adapter(str(folder), adapter_name=name)

    def _model(self, names: Sequence[str]):
        import contextlib

        if self.pm is None:
            return self.model, contextlib.nullcontext()
        if not names:
            return self.pm, self.pm.disable_adapter()
        self.pm.base_model.set_adapter(list(names))
        return self.pm, contextlib.nullcontext()

    @torch.inference_mode()
    def prefill_decode(self, prompt, n, adapters):
        model, scope = self._model(adapters)
        with scope:
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = _argmax(out.logits[:, -1])
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(n):
                out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                tok = _argmax(out.logits[:, -1])
            return t1 - t0, time.perf_counter() - t1

    def switch(self, name):
        self.pm.set_adapter(name)

    @torch.inference_mode()
    def batched(self, prompts, n, adapters):
        pm = self.pm
        B = len(prompts)
        out = pm(input_ids=torch.tensor(prompts), use_cache=True, logits_to_keep=1, adapter_names=list(adapters))
        past, tok = out.past_key_values, _argmax(out.logits[:, -1])
        t0 = time.perf_counter()
        for _ in range(n):
            out = pm(input_ids=tok.view(B, 1), past_key_values=past, use_cache=True, logits_to_keep=1,
                     adapter_names=list(adapters))
            past, tok = out.past_key_values, _argmax(out.logits[:, -1])
        return time.perf_counter() - t0

    def weight_bytes(self) -> int | None:
        """Parameter and buffer bytes of the base model but the embedding table (plus one row)."""
        m = self.model
        emb = m.get_input_embeddings().weight
        total = 0
        for p in m.parameters():
            total += p.numel() * p.element_size()
            qs = getattr(p, "quant_state", None)  # bitsandbytes: per-block scales live beside the codes
            if qs is not None and getattr(qs, "absmax", None) is not None:
                total += qs.absmax.numel() * qs.absmax.element_size()
        return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def make_engine(engine: str, fmt: str, mode: str, files, threads: int, task: str = "") -> Engine:
    if engine == "qadapt" and task == "xlora":
        return QadaptXLoraEngine(files.gguf(fmt), files.xlora, mode, threads)
    if engine == "qadapt":
        return QadaptEngine(files.gguf(fmt), mode, threads)
    if engine == "llama.cpp":
        return LlamaCppEngine(files.gguf(fmt), threads)
    if engine == "mistral.rs":
        from .mistralrs_engine import MistralRsEngine

        return MistralRsEngine(files.gguf(fmt), threads)
    if engine == "transformers":
        return HFEngine(files.hf, None, threads)
    if engine == "bnb":
        return HFEngine(files.hf, "nf4", threads)
    raise ValueError(engine)
