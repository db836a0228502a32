"""Full-precision LoRA deltas on top of any base linear, quantized or not.

``LoraLinear`` wraps (never subclasses) a :class:`~qadapt.quant.base.BaseLinear`
and keeps each loaded adapter's factors for that layer. Which adapters apply is
an argument of every forward (an :class:`AdapterContext`), not state on the
layer, so switching adapters costs nothing and concurrent requests can use
different ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraFactors:
    """One adapter on one layer: ``delta(x) = scale * B(A(x))``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoraAdapter:
    """A loaded adapter: its name, where it came from, and its factors per module path."""

    name: str
    source: str
    folder: Path
    config: Any  # peft_format.LoraAdapterConfig
    factors: dict[str, LoraFactors]

    @property
    def nbytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
                   for f in self.factors.values())


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

    def row_groups(self) -> dict[str, torch.Tensor]:
        """adapter name -> indices of the rows that use it (computed once per forward)."""
        cached = self.extra.get("_groups")
        if cached is None:
            groups: dict[str, list[int]] = {}
            for i, names in enumerate(self.rows or ()):
                for n in names:
                    groups.setdefault(n, []).append(i)
            cached = {n: torch.tensor(ix) for n, ix in groups.items()}
            self.extra["_groups"] = cached
        return cached


class LoraLinear(nn.Module):
    """``y = base(x) + sum_i scale_i * B_i(A_i(x))`` over the active adapters that have this layer."""

    takes_context = True

    def __init__(self, base: nn.Module, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qtype = getattr(base, "qtype", "?")
        self.adapters: dict[str, LoraFactors] = {}

    def add(self, name: str, f: LoraFactors) -> None:
        if f.A.shape[1] != self.in_features or f.B.shape[0] != self.out_features:
            raise AdapterError(
                f"adapter `{name}`: layer {self.path}: lora_A {tuple(f.A.shape)} / lora_B {tuple(f.B.shape)} do not "
                f"fit the base layer's [out={self.out_features}, in={self.in_features}]"
            )
        self.adapters[name] = f

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        f = self.adapters[name]
        return (x.to(f.A.dtype) @ f.A.T) @ f.B.T * f.scale

    def forward(self, x: torch.Tensor, ctx: AdapterContext | None = None) -> torch.Tensor:
        y = self.base(x)
        if ctx is None:
            return y
        if ctx.xlora is not None:
            return ctx.xlora.apply(self, x, y)
        if ctx.rows is not None:
            if len(ctx.rows) != x.shape[0]:
                raise ValueError(f"{len(ctx.rows)} row adapter sets for a batch of {x.shape[0]}")
            for name, ix in ctx.row_groups().items():
                if name in self.adapters:
                    # index_put with accumulate: index_add is pathologically slow on a busy CPU
                    y = y.index_put((ix,), self.delta(x.index_select(0, ix), name).to(y.dtype), accumulate=True)
            return y
        for name in ctx.active:
            if name in self.adapters:
                y = y + self.delta(x, name).to(y.dtype)
        return y

    # ---- merging (dense bases only): fold the deltas into the weight, restore it exactly
    def merge(self, names: tuple[str, ...]) -> None:
        w = getattr(self.base, "weight", None)
        if w is None or not getattr(self.base, "weight_is_dense", False):
            raise AdapterError(f"{self.path}: merging needs a dense base layer (load with mode='dequantize')")
        if not hasattr(self, "_unmerged"):
            self._unmerged = w.detach().clone()
        with torch.no_grad():
            for name in names:
                if name in self.adapters:
                    f = self.adapters[name]
                    w += ((f.B.double() @ f.A.double()) * f.scale).to(w.dtype)

    def unmerge(self) -> None:
        if hasattr(self, "_unmerged"):
            with torch.no_grad():
                self.base.weight.copy_(self._unmerged)
            del self._unmerged

    @property
    def weight_is_dense(self) -> bool:
        return getattr(self.base, "weight_is_dense", False)

    def extra_repr(self) -> str:
        return f"{self.path}, adapters={list(self.adapters)}"
