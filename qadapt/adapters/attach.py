"""Attaching a built adapter to a model's layers: LoRA factors and saved modules on the linear wrappers, the
embedding parts on the token embedding's wrapper, and, on a model whose output layer shares the token table
(tied embeddings), the table changes on the output layer too (PEFT applies them to both)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .lora import LoraAdapter, SavedModule, wide


def attach(model: Any, adapter: LoraAdapter) -> None:
    """Every part of ``adapter`` onto ``model``'s layers (``model.lock`` held by the caller)."""
    name = adapter.name
    for path, m in adapter.saved.items():  # before the factors: DoRA's norm uses the layer's own weight
        model._wrapper(path).add_saved(name, m)
    for path, f in list(adapter.factors.items()):
        w = model._wrapper(path)
        if f.A.dtype in (torch.float16, torch.bfloat16) and w._native() is None:
            # half-precision factors pay off where the native kernel streams them; torch's matmuls would widen
            # them on every call (per token, per layer), so on other bases they are widened once, here
            f = adapter.factors[path] = replace(f, A=wide(f.A), B=wide(f.B))
        w.add(name, f)
    e = adapter.embedding
    if e is None:
        return
    embedding(model).add(name, e)
    head = next((r.path for r in model.layer_map.enumerate_modules(0) if r.spec.role == "lm_head"), None)
    if not model.config.tie_embeddings or head is None or head in adapter.saved:
        return
    if e.table is not None:
        model._wrapper(head).add_saved(name, SavedModule(weight=e.table))
    elif e.token_ids is not None:
        model._wrapper(head).add_saved(name, SavedModule(row_ids=e.token_ids, row_weight=e.token_rows))


def embedding(model: Any):
    """The decoder's token embedding, wrapped for adapters (once)."""
    from .embedding import AdaptedEmbedding

    dec = model.decoder
    if not isinstance(dec.embed, AdaptedEmbedding):
        dec.embed = AdaptedEmbedding(dec.embed)
    return dec.embed
