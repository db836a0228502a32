"""Batched prefill and decode over the rows of one static KV cache (continuous batching).

Model-agnostic: the caller passes ``forward(ids [B, T], positions [B, T], cache,
row_adapters) -> logits [B, V]`` (the last position's logits of each row), where
``row_adapters`` holds each row's own adapter keys (a heterogeneous-LoRA batch).
A :class:`BatchStepper` owns a :class:`~qadapt.runtime.kv_cache.KVCache` with one
row per concurrent sequence; a forward touches only the rows it names, through a
:class:`RowCache` view, so a prefill of one new sequence does not run the others
and a decode step runs exactly the active rows, each at its own position.

A row's stale keys beyond its position are never attended (the mask is built from
positions) and are overwritten as it advances, so a finished row is handed to a
new sequence without clearing.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .kv_cache import KVCache, write_kv

#: forward(ids [B, T], positions [B, T], cache, row adapter keys) -> last-position logits [B, V]
ForwardFn = Callable[[torch.Tensor, torch.Tensor, "RowCache", tuple[tuple[str, ...], ...]], torch.Tensor]


class RowCache:
    """The rows ``rows`` of a :class:`KVCache`, with the same ``prepare``/``update`` contract.

    Consecutive rows are a slice (views, no copies); other sets gather their keys.
    """

    def __init__(self, cache: KVCache, rows: Sequence[int]):
        self.cache = cache
        self.rows = list(rows)
        self.batch = len(self.rows)
        self.max_len = cache.max_len
        lo = self.rows[0]
        self._slice = slice(lo, lo + self.batch) if self.rows == list(range(lo, lo + self.batch)) else None
        self._index = torch.tensor(self.rows)
        self._n_keys = 0
        self._span: slice | None = None
        self._rows: torch.Tensor | None = None

    def prepare(self, positions: torch.Tensor) -> int:
        """KVCache's check, key count and write plan, over this view's ``max_len``, ``batch`` and rows."""
        return KVCache.prepare(self, positions)  # type: ignore[arg-type]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, T, Hkv, D] at positions [B, T] of these rows; return their keys/values [B, Hkv, S, D]."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        n = self._n_keys
        if self._slice is not None:
            kv, vv = kc[self._slice], vc[self._slice]
            write_kv(kv, vv, self._span, self._rows, positions, k, v)
            return kv[:, :, :n], vv[:, :, :n]
        rows = self._index.unsqueeze(1).expand_as(positions)
        kc[rows, :, positions] = k.to(kc.dtype)
        vc[rows, :, positions] = v.to(vc.dtype)
        return kc[self._index, :, :n], vc[self._index, :, :n]


class BatchStepper:
    """Prefill one sequence into a cache row; decode one token for many rows in one forward."""

    def __init__(self, forward: ForwardFn, cache: KVCache):
        self.forward = forward
        self.cache = cache

    @property
    def rows(self) -> int:
        return self.cache.batch

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int], adapters: tuple[str, ...], start: int = 0) -> torch.Tensor:
        """Run ``ids`` at positions ``start..`` of ``row``; the logits [V] after the last one."""
        t = torch.tensor([list(ids)], dtype=torch.long)
        pos = torch.arange(start, start + t.shape[1]).unsqueeze(0)
        return self.forward(t, pos, RowCache(self.cache, [row]), (adapters,))[0]

    @torch.inference_mode()
    def prefill_scored(self, row: int, ids: Sequence[int], adapters: tuple[str, ...], top: int,
                       score: Callable) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`prefill` through ``score(ids, positions, cache, rows, top)`` (``Model.score_step``): the
        logits [V] after the last id and the prompt's scores (see :meth:`qadapt.api.Model.score_step`)."""
        t = torch.tensor([list(ids)], dtype=torch.long)
        pos = torch.arange(t.shape[1]).unsqueeze(0)
        logits, scores = score(t, pos, RowCache(self.cache, [row]), (adapters,), top)
        return logits[0], tuple(x[0] for x in scores)

    @torch.inference_mode()
    def decode(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               adapters: Sequence[tuple[str, ...]]) -> torch.Tensor:
        """One token per row (``tokens[i]`` at ``positions[i]`` of ``rows[i]``) in one forward: logits [n, V]."""
        order = sorted(range(len(rows)), key=lambda i: rows[i])  # ascending rows: a slice when consecutive
        ids = torch.tensor([[tokens[i]] for i in order], dtype=torch.long)
        pos = torch.tensor([[positions[i]] for i in order], dtype=torch.long)
        logits = self.forward(ids, pos, RowCache(self.cache, [rows[i] for i in order]),
                              tuple(adapters[i] for i in order))
        out = torch.empty_like(logits)
        out[torch.tensor(order)] = logits
        return out
