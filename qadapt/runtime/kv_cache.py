"""A static, preallocated key/value cache written at each row's own positions.

Rows may sit at different positions (continuous batching, right-padded
prompts): a row's keys at positions beyond its current one are never visible
to it (the causal mask is built from positions), and are overwritten as it
advances, so padding needs no bookkeeping.
"""

from __future__ import annotations

import torch

from ..errors import QadaptError


class KVCache:
    def __init__(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len, self.batch = max_len, batch
        self._n_keys = 0
        self._span: slice | None = None
        self._rows: torch.Tensor | None = None

    def prepare(self, positions: torch.Tensor) -> int:
        """Called once per forward: how many key slots this step attends over.

        Also decides how every layer writes this step's keys: when all rows sit at the same
        consecutive positions (a prefill, a decode step, a uniform batch) as one slice copy,
        otherwise by index (rows at different positions)."""
        top = int(positions.max()) + 1
        if top > self.max_len:
            raise QadaptError(f"sequence of {top} tokens exceeds the cache of {self.max_len} (the context length)")
        if positions.shape[0] != self.batch:
            raise ValueError(f"batch of {positions.shape[0]} rows for a cache of {self.batch}")
        self._n_keys = top
        B, T = positions.shape
        start = top - T
        if start >= 0 and ((B == 1 and T == 1) or torch.equal(
                positions, torch.arange(start, top, device=positions.device).expand(B, T))):
            self._span, self._rows = slice(start, top), None
        else:
            self._span, self._rows = None, torch.arange(B, device=positions.device).unsqueeze(1).expand_as(positions)
        return top

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, T, Hkv, D] at positions [B, T]; return this layer's keys/values [B, Hkv, S, D]."""
        kc, vc = self.k[layer], self.v[layer]
        write_kv(kc, vc, self._span, self._rows, positions, k, v)
        return kc[:, :, : self._n_keys], vc[:, :, : self._n_keys]

    def reset_rows(self, rows: list[int]) -> None:
        """Free rows for new sequences (stale entries are masked by position anyway)."""
        for kc, vc in zip(self.k, self.v):
            kc[rows] = 0
            vc[rows] = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def write_kv(kc: torch.Tensor, vc: torch.Tensor, span: slice | None, rows: torch.Tensor | None,
             positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k/v [B, T, Hkv, D] into caches [B, Hkv, S, D] as :meth:`KVCache.prepare` planned: one slice
    copy when ``span`` is set (every row at the same consecutive positions), else by (row, position) index."""
    if span is not None:
        kc[:, :, span].copy_(k.transpose(1, 2))
        vc[:, :, span].copy_(v.transpose(1, 2))
    else:
        kc[rows, :, positions] = k.to(kc.dtype)
        vc[rows, :, positions] = v.to(vc.dtype)
