"""What is inside a model file, from its metadata alone (``qadapt inspect``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


def describe(model: str, gguf_file: str | None = None, revision: str | None = None) -> dict[str, Any]:
    from .load_model import _resolve_model_path
    from .formats.gguf import GGUFFile
    from .layer_maps import gguf_layer_map
    from .models.config import config_from_gguf

    path = _resolve_model_path(model, gguf_file, revision)
    if path.is_dir():  # a transformers folder (full precision, GPTQ or bitsandbytes)
        from .formats.quantized import describe_folder

        return describe_folder(path)
    gf = GGUFFile(path)
    lm = gguf_layer_map(gf)
    cfg = config_from_gguf(gf, lm)
    shapes = cfg.shapes
    targetable = []
    for ls in lm.layers:
        t = gf.tensors.get(ls.gguf_name(0) + ".weight") or (
            gf.tensors.get("token_embd.weight") if ls.role == "lm_head" else None
        )
        in_f, out_f = ls.shape(shapes)
        targetable.append({
            "name": ls.name, "path": ls.path, "gguf": ls.gguf, "per_block": ls.per_block,
            "in_features": in_f, "out_features": out_f, "qtype": t.qtype if t else "missing",
            "supported_formats": list(ls.formats),
        })
    config = {k: v for k, v in asdict(cfg).items() if k != "extra"}
    config["eos_token_ids"] = list(cfg.eos_token_ids)
    return {
        "path": str(path),
        "file_size": gf.file_size,
        "architecture": lm.architecture,
        "gguf_architecture": gf.architecture,
        "config": config,
        "tensor_types": [{"type": k, "count": n, "bytes": b} for k, (n, b) in sorted(gf.type_counts().items())],
        "tensor_count": len(gf.tensors),
        "targetable": targetable,
        "tokenizer": gf.get("tokenizer.ggml.model"),
    }
