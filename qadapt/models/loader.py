"""Base-model loading: detect the format from file contents, read config and tensors, build the decoder."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..layer_maps import LayerMap, get_layer_map
from ..tokenizer import Tokenizer
from .decoder import Decoder


@dataclass
class LoadedBase:
    decoder: Decoder
    tokenizer: Tokenizer | None
    layer_map: LayerMap
    base_format: str  # "gguf" | "full" | "gptq" | "bnb"
    info: dict[str, Any]


def load_base(path: Path, *, mode: str, dtype: torch.dtype) -> LoadedBase:
    """A GGUF file (detected by its magic bytes)."""
    from ..formats.gguf import GGUFFile
    from .build import GGUFSource, build_decoder
    from .config import config_from_gguf
    from .family import FAMILIES

    if path.is_dir():
        raise InputError(f"{path} is a folder; transformers checkpoints are not supported yet, pass a .gguf file")
    gf = GGUFFile(path)  # raises the precise error for empty / non-GGUF / truncated files
    lm = get_layer_map(gf.architecture)
    cfg = config_from_gguf(gf, lm)
    tok = Tokenizer.from_gguf(gf) if "tokenizer.ggml.tokens" in gf.metadata else None
    if tok is not None:
        cfg = replace(cfg, bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids or cfg.eos_token_ids)
    decoder = build_decoder(cfg, lm, FAMILIES[lm.architecture], GGUFSource(gf, mode, dtype),
                            desc=f"loading {path.name}")
    decoder.eval()
    info = {"file_size": gf.file_size, "types": gf.type_counts(), "path": str(path)}
    return LoadedBase(decoder, tok, lm, "gguf", info)
