"""What one forward applies: the adapters of every row (or per row), X-LoRA's scalings, aLoRA's starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class AdapterContext:
    """What a forward applies.

    ``active``: adapter names applied to every row. ``rows``: per batch row, its own
    adapter names (heterogeneous batches, as LoRAX's BGMV: each row gathers its
    adapters); when set it replaces ``active``. ``xlora`` (set by the X-LoRA runtime)
    carries per-token scalings; plain LoRA leaves it None.
    """

    active: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] | None = None
    xlora: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: aLoRA adapter name -> per batch row, the position its delta starts at (a huge value: never)
    alora: dict[str, torch.Tensor] = field(default_factory=dict)

    def token_mask(self, name: str, ix: torch.Tensor | None) -> torch.Tensor | None:
        """[rows, T] where ``name``'s delta applies (None: everywhere), from the positions of the running
        forward (``extra["positions"]``, set per chunk by the decoder)."""
        start = self.alora.get(name)
        if start is None:
            return None
        pos = self.extra["positions"]
        start = start.to(pos.device)
        if ix is not None:
            ix = ix.to(pos.device)
            pos, start = pos.index_select(0, ix), start.index_select(0, ix)
        return pos >= start.unsqueeze(1)

    def narrow(self, rows: torch.Tensor, cols: torch.Tensor) -> "AdapterContext":
        """A context for a forward whose rows are single tokens of this one's (row ``rows[n]``, position
        ``cols[n]``): a mixture-of-experts layer runs an expert on the tokens routed to it."""
        ctx = AdapterContext(self.active, None if self.rows is None else tuple(self.rows[i] for i in rows.tolist()))
        if "slots" in self.extra:  # the same device slots, each token its row's
            bank, indices = self.extra["slots"]
            ctx.extra["slots"] = (bank, [ix.index_select(0, rows.to(ix.device)) for ix in indices])
            ctx.extra["device"] = self.extra["device"]
            if "general_rows" in self.extra:  # each token whose row runs the general path, for the same adapters
                src = rows.tolist()
                general = {n: (set(ix.tolist()), ix.device) for n, ix in self.extra["general_rows"].items()}
                ctx.extra["general_rows"] = {
                    n: torch.tensor([k for k, r in enumerate(src) if r in keep], dtype=torch.long, device=dev)
                    for n, (keep, dev) in general.items()}
        if self.alora:
            ctx.alora = {n: s.index_select(0, rows) for n, s in self.alora.items()}
            ctx.extra["positions"] = self.extra["positions"][rows, cols].unsqueeze(1)
        return ctx

    def row_groups(self) -> dict[str, torch.Tensor]:
        """adapter name -> indices of the rows that use it (computed once per forward)."""
        cached = self.extra.get("_groups")
        if cached is None:
            groups: dict[str, list[int]] = {}
            for i, names in enumerate(self.rows or ()):
                for n in names:
                    groups.setdefault(n, []).append(i)
            dev = self.extra.get("device")  # a device batch's: where its rows are gathered
            cached = {n: torch.tensor(ix, device=dev) for n, ix in groups.items()}
            self.extra["_groups"] = cached
        return cached
