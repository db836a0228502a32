"""``qadapt.load(...)``: a :class:`~qadapt.api.Model` from a path or Hub id, its adapters attached.

Resolving the path (a local file or folder, a Hub GGUF file or transformers repo), building the base in the
chosen mode, the tokenizer and chat template, the adapters, ordering files and X-LoRA.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .api import MODES, Model
from .errors import InputError, SourceError
from .models.decoder import Decoder
from .quant import native, repack

log = logging.getLogger(__name__)


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
    kernels: str | None = None,
    chat_template: str | os.PathLike | None = None,
    device: str | None = None,
    max_slots: int | None = None,
    max_slot_rank: int | None = None,
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

    ``kernels``: ``"auto"`` (the default, or ``$QADAPT_KERNELS``) computes in place as llama.cpp does on
    the GGUF types its native kernels run (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL/Q4_K/Q5_K/Q6_K, CPUs with AVX2):
    activations quantized to 8 bits per block of 32, integer dot products, the fused decode step; several
    times faster, with an activation-rounding error (bounded, see ``qadapt/quant/native/ggml_kernels.c``
    and the README's numerical contract). ``"exact"``: float32 activations on gguf-py's weights for every
    type, for verification. ``"q8"``: ``auto`` stated explicitly (a warning where it cannot run).

    ``device``: ``"cuda"`` (or ``"cuda:N"``) runs on an NVIDIA GPU: GGUF weights stay in their blocks there
    (``kernels="triton"``: Q8_0/Q4_0/Q4_K/Q6_K multiplied by Triton kernels that decode the blocks, the other
    types dequantized a chunk at a time), dequantize mode holds them dense in ``dtype``; the KV cache is on
    the GPU and each batch's adapters sit in ``max_slots`` device slots of rank up to ``max_slot_rank``
    (16 and 64 by default), one gathered kernel pair per layer. ``kernels="triton"`` without a device runs
    the same on CPU under Triton's interpreter (``TRITON_INTERPRET=1``): slow, for verification.

    ``chat_template``: a Jinja chat template (a string, or a ``.jinja`` / ``tokenizer_config.json`` file) used
    by :meth:`Model.chat` instead of the model's own; a model with neither refuses chat.
    """
    from .models.loader import load_base

    if kwargs:
        raise InputError(f"unknown argument(s) to qadapt.load: {', '.join(sorted(kwargs))}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    from .quant.kernels import resolve_kernels

    explicit = kernels
    on_device = device is not None and torch.device(device).type != "cpu"
    if on_device and kernels is None:
        kernels = "triton"
    kernels = resolve_kernels(kernels)
    if on_device and kernels not in ("triton", "exact") and mode == "inplace":
        raise InputError(f"kernels={kernels!r} are CPU kernels; on {device} GGUF weights run with kernels='triton'")
    if on_device and mode == "inplace":
        kernels = "triton"
    if (max_slots is not None or max_slot_rank is not None) and not (on_device or kernels == "triton"):
        raise InputError("max_slots / max_slot_rank size the device slots: they apply with device='cuda' or "
                         "kernels='triton'")
    if explicit == "q8" and mode != "inplace":
        raise InputError("kernels='q8' (--kernels q8) runs quantized weights in place; with mode='dequantize' "
                         "the weights are dense float and take the exact kernels: drop one of the two")
    path = _resolve_model_path(path_or_id, gguf_file, revision)
    with repack.deferred():  # q8 layers map the file; their 8-row repack runs after, off the load's path
        base = load_base(path, mode=mode, dtype=_dtype(dtype), quant=quant, double_quant=double_quant,
                         kernels=kernels)
    if kernels not in ("exact", "triton") and mode == "inplace":
        _use_native_ops(base.decoder, warn=kernels == "q8")
    repack.start(base.decoder)
    model = Model(base.decoder, base.tokenizer, base.layer_map, str(path), mode, base.base_format, base.info)
    if on_device or kernels == "triton":
        from .device import DEFAULT_SLOT_RANK, DEFAULT_SLOTS, place

        place(model, device or "cpu", slots=max_slots or DEFAULT_SLOTS, slot_rank=max_slot_rank or DEFAULT_SLOT_RANK)
    if chat_template is not None:
        model.chat_template = _chat_template(chat_template)
    if xlora is not None:
        _attach_xlora(model, xlora, ordering, adapter_model_id, tgt_non_granular_index, adapters, activate, merge)
        if model._slots is not None:
            from .device import xlora_on_device

            xlora_on_device(model)
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


def _use_native_ops(decoder: Decoder, warn: bool) -> None:
    """The fused native decode step on a decoder built for the fast kernels (where the library runs)."""
    from .quant import native

    lib = native.library()
    say = log.warning if warn else log.info
    if lib is None:
        say("the native kernels are unavailable (no C compiler, or QADAPT_NATIVE=0): the torch kernels run "
            "(4-bit types in bf16)")
    elif not lib.simd:
        say("the q8 kernels need AVX2; this CPU runs the torch kernels (4-bit types in bf16)")
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
