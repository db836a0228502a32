"""Adapters on the token embedding, per row of a batch: an adapter's own table, new or retrained token rows
(PEFT's TrainableTokens, ``trainable_token_indices``) and LoRA on the embedding (``lora_embedding_A/B``).

``AdaptedEmbedding`` wraps the base's embedding (quantized or not) as :class:`~qadapt.adapters.lora.LoraLinear`
wraps a linear: which adapters apply is the forward's context, so rows without them read the base table
untouched. PEFT's order: the adapter's table (its ``base_layer``), its token rows, then the LoRA delta
``scale * B(A^T[ids])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from .lora import AdapterContext, EmbeddingParts


class AdaptedEmbedding(nn.Module):
    takes_context = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.parts: dict[str, EmbeddingParts] = {}

    def add(self, name: str, p: EmbeddingParts) -> None:
        v, h = self.num_embeddings, self.embedding_dim
        if p.table is not None and tuple(p.table.shape) != (v, h):
            raise AdapterError(f"adapter `{name}`: its embedding table is {tuple(p.table.shape)}, the base's [{v}, {h}]"
                               + (" (the adapter resized the vocabulary, which is not supported yet)"
                                  if p.table.shape[0] != v else ""))
        if p.token_ids is not None:
            if p.token_rows is None or tuple(p.token_rows.shape) != (len(p.token_ids), h):
                raise AdapterError(f"adapter `{name}`: trainable token rows do not fit {len(p.token_ids)} ids x {h}")
            if len(p.token_ids) and (int(p.token_ids.min()) < 0 or int(p.token_ids.max()) >= v):
                raise AdapterError(f"adapter `{name}`: trainable token id {int(p.token_ids.max())} is outside the "
                                   f"vocabulary of {v} (the adapter added tokens: not supported yet)")
        if p.A is not None and (p.A.shape[1] != v or p.B.shape[0] != h):
            raise AdapterError(f"adapter `{name}`: lora_embedding_A {tuple(p.A.shape)} / lora_embedding_B "
                               f"{tuple(p.B.shape)} do not fit the embedding [{v}, {h}]")
        self.parts[name] = p

    def remove(self, name: str) -> None:
        self.parts.pop(name, None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.base.dequantize(dtype)

    def forward(self, ids: torch.Tensor, ctx: AdapterContext | None = None) -> torch.Tensor:
        x = self.base(ids)
        if ctx is None or not self.parts or ctx.xlora is not None:
            return x
        if ctx.rows is not None:
            groups = ctx.row_groups()
            pairs = [(n, None if len(ix) == ids.shape[0] else ix) for n, ix in groups.items() if n in self.parts]
        else:
            pairs = [(n, None) for n in ctx.active if n in self.parts]
        for name, ix in pairs:
            x = self._apply(self.parts[name], ids, x, ix)
        return x

    @staticmethod
    def _apply(p: EmbeddingParts, ids: torch.Tensor, x: torch.Tensor, ix: torch.Tensor | None) -> torch.Tensor:
        rows_ids = ids if ix is None else ids.index_select(0, ix)
        rows = x if ix is None else x.index_select(0, ix)
        if p.table is not None:
            rows = F.embedding(rows_ids, p.table).to(x.dtype)
        if p.token_ids is not None and len(p.token_ids):
            hit = torch.isin(rows_ids, p.token_ids)
            if bool(hit.any()):
                which = (rows_ids[hit].unsqueeze(-1) == p.token_ids).int().argmax(-1)
                rows = rows.clone()
                rows[hit] = p.token_rows[which].to(rows.dtype)
        if p.A is not None:
            after_a = F.embedding(rows_ids, p.A.T)
            rows = rows + (after_a @ p.B.T * p.scale).to(rows.dtype)
        return rows if ix is None else x.index_copy(0, ix, rows)
