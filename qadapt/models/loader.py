"""Base-model loading: detect the format from file contents, read config and tensors, build the decoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, UnsupportedError
from ..layer_maps import LayerMap, gguf_layer_map, hf_layer_map
from ..tokenizer import Tokenizer
from ..quant import repack
from .decoder import Decoder

log = logging.getLogger(__name__)

#: Files that make a folder's tokenizer loadable by transformers.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedBase:
    decoder: Decoder
    tokenizer: Tokenizer | None
    layer_map: LayerMap
    base_format: str  # "gguf" | "full" | "gptq" | "bnb"
    info: dict[str, Any]


def load_base(path: Path, *, mode: str, dtype: torch.dtype, quant: str | None = None,
              double_quant: bool = False, kernels: str = "exact") -> LoadedBase:
    """A GGUF file (detected by its magic bytes) or a transformers folder (``config.json`` + safetensors).

    ``quant`` (a GGUF type such as ``Q4_0``) quantizes a full-precision checkpoint's linears on load.
    """
    from ..formats.hf import is_hf_folder

    if path.is_dir():
        if not is_hf_folder(path):
            raise InputError(f"{path} is a folder without config.json; pass a .gguf file or a transformers folder")
        return _load_hf(path, mode, dtype, quant, double_quant, kernels)
    if quant is not None:
        raise InputError(f"quant={quant!r} applies to full-precision transformers checkpoints; {path} is a "
                         "GGUF file and keeps its own types")
    return _load_gguf(path, mode, dtype, kernels)


def _load_gguf(path: Path, mode: str, dtype: torch.dtype, kernels: str = "exact") -> LoadedBase:
    from ..formats.gguf import GGUFFile
    from .build import GGUFSource, build_decoder
    from .config import config_from_gguf
    from .family import FAMILIES

    gf = GGUFFile(path)  # raises the precise error for empty / non-GGUF / truncated files
    lm = gguf_layer_map(gf)
    cfg = config_from_gguf(gf, lm)
    tok = _gguf_tokenizer(gf)
    if tok is not None:
        cfg = replace(cfg, bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids or cfg.eos_token_ids)
    decoder = build_decoder(cfg, lm, FAMILIES[lm.architecture], GGUFSource(gf, mode, dtype, kernels),
                            desc=f"loading {path.name}")
    decoder.eval()
    info = {"file_size": gf.file_size, "types": gf.type_counts(), "path": str(path)}
    gf.release_pages()
    repack.after_pass(gf.release_pages)  # again once deferred repacks have read their blocks
    return LoadedBase(decoder, tok, lm, "gguf", info)


def _gguf_tokenizer(gf) -> Tokenizer | None:
    """The file's tokenizer; None (token ids only, with a warning naming why) for a vocabulary llama.cpp's
    rules cannot be followed for (an unsupported tokenizer model or pre-tokenizer)."""
    if "tokenizer.ggml.tokens" not in gf.metadata:
        return None
    try:
        return Tokenizer.from_gguf(gf)
    except UnsupportedError as e:
        log.warning("%s; the model runs on token ids only", e)
        return None


def _load_hf(path: Path, mode: str, dtype: torch.dtype, quant: str | None, double_quant: bool = False,
             kernels: str = "exact") -> LoadedBase:
    from ..formats.hf import HFCheckpoint, HFSource
    from ..layer_maps import base_format_of
    from .build import build_decoder
    from .config import config_from_hf
    from .family import FAMILIES

    from ..io import read_json

    hf_layer_map(read_json(path / "config.json", "model config"), path / "config.json")  # before any weights
    ckpt = HFCheckpoint(path)
    lm = hf_layer_map(ckpt.config, path / "config.json")
    spec = FAMILIES[lm.architecture]
    cfg = config_from_hf(ckpt.config, lm, str(path / "config.json"), spec.tie_embeddings_default)
    from ..formats.quantized import open_quant_reader

    reader = open_quant_reader(ckpt, quant, mode, dtype, lm, double_quant=double_quant)  # GPTQ / bnb, or None
    base_format, qtype = base_format_of(quant if reader is None else None)
    if base_format not in ("full", "gguf"):
        raise UnsupportedError(f"in-situ quantization to {quant} is not supported; use a GGUF type "
                               "(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16, BF16)")
    if base_format == "full":  # f16/bf16 store half-precision bytes; none/f32 keep the checkpoint's tensors
        qtype = {"f16": "F16", "fp16": "F16", "float16": "F16", "bf16": "BF16"}.get(qtype or "")
    if qtype is not None:
        from ..quantize import check_quant_type

        check_quant_type(qtype)
    tok = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        tok = Tokenizer.from_folder(path, cfg.bos_token_id, cfg.eos_token_ids)
    src = HFSource(ckpt, mode, dtype, qtype, reader=reader, kernels=kernels)
    desc = f"quantizing {path.name} to {qtype}" if qtype else f"loading {path.name}"
    decoder = build_decoder(cfg, lm, spec, src, desc=desc)
    decoder.eval()
    types = dict(src.quantized) if qtype else ckpt.type_counts()
    info = {"file_size": ckpt.file_size, "types": types, "path": str(path), "quant": qtype}
    fmt = "gguf" if base_format == "gguf" else "full"
    if reader is not None:
        fmt, info["quant"], info["quant_config"] = reader.base_format, reader.quant, reader.describe()
        info["quant_layers"] = dict(reader.counts)
    log.info("loaded %s (%s) from %s%s", lm.architecture, fmt, path, f", quantized to {qtype}" if qtype else "")
    return LoadedBase(decoder, tok, lm, fmt, info)
