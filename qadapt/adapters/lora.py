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
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..quant.native import lora_plan, row_stride

log = logging.getLogger(__name__)


_EPOCH = [0]


def adapters_epoch() -> int:
    """Bumped whenever any layer gains or loses an adapter (or a wrapper): plans holding factor addresses
    built for a whole model (the decoder's one-call decode step) key on it."""
    return _EPOCH[0]


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
    """``y = base(x) + sum_i scale_i * B_i(A_i(x))`` over the active adapters that have this layer.

    Each adapter's factors are held once (``B`` as the transposed view of a contiguous ``B^T``, the
    layout the second matmul reads fastest) and each active adapter costs two small matmuls on
    its own tensors: no stacked copies, so memory stays the adapters' files whatever the sets
    and batches asked for. On the q8 runtime a decode step's deltas are one native call.
    """

    takes_context = True

    def __init__(self, base: nn.Module, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qtype = getattr(base, "qtype", "?")
        self.adapters: dict[str, LoraFactors] = {}
        #: per adapter, ``B.T`` contiguous [r, out] (a view of ``B`` when the adapter was loaded by qadapt)
        self._bt: dict[str, torch.Tensor] = {}
        #: ctx.active -> (the names present here, the native call's (A, Bt, scale) per adapter and plans per
        #: token count, or None)
        self._plans: dict[tuple[str, ...], tuple] = {}
        _EPOCH[0] += 1  # a new wrapper: plans that hold factor addresses key on the epoch

    def _native(self) -> Any:
        """The native kernels when the base runs the q8 path (its decode steps are native calls too)."""
        from ..quant.base import BaseLinear

        return self.base.q8_kernels() if isinstance(self.base, BaseLinear) else None

    def _fits_native(self, name: str) -> bool:
        A = self.adapters[name].A
        return A.dtype == torch.float32 and A.shape[0] <= 256

    def _plan(self, active: tuple[str, ...]) -> tuple:
        names = tuple(n for n in active if n in self.adapters)
        native = None
        lib = self._native()
        if lib is not None and names and all(self._fits_native(n) for n in names):
            native = (lib, [(self.adapters[n].A, self._bt[n], self.adapters[n].scale) for n in names], {})
        plan = self._plans[active] = (names, native)
        return plan

    def add(self, name: str, f: LoraFactors) -> None:
        if f.A.shape[1] != self.in_features or f.B.shape[0] != self.out_features:
            raise AdapterError(
                f"adapter `{name}`: layer {self.path}: lora_A {tuple(f.A.shape)} / lora_B {tuple(f.B.shape)} do not "
                f"fit the base layer's [out={self.out_features}, in={self.in_features}]"
            )
        bt = f.B.T
        if bt.dtype != f.A.dtype or not bt.is_contiguous():
            bt = bt.to(f.A.dtype).contiguous()
        self.adapters[name] = f
        self._bt[name] = bt
        self._plans = {}
        _EPOCH[0] += 1

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._bt.pop(name, None)
        self._plans = {}
        _EPOCH[0] += 1

    def native_entries(self, ctx: AdapterContext | None, m: int) -> list[tuple] | None:
        """This layer's deltas on ``m`` rows under ``ctx`` as native LoRA entries (row, A, Bt, scale), for a
        call shared with the layers beside it (:meth:`qadapt.models.native.NativeBlock.project`); None
        when the native kernel cannot take them (X-LoRA, no q8 base, a factor it does not take)."""
        if ctx is None:
            return []
        if ctx.xlora is not None or self._native() is None:
            return None
        if ctx.rows is not None:
            if len(ctx.rows) != m:
                return None
            pairs = [(i, n) for i, row in enumerate(ctx.rows) for n in row if n in self.adapters]
        else:
            pairs = [(i, n) for i in range(m) for n in ctx.active if n in self.adapters]
        if not all(self._fits_native(n) for _, n in pairs):
            return None
        return [(i, self.adapters[n].A, self._bt[n], self.adapters[n].scale) for i, n in pairs]

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scale * B(A(x))`` for one adapter, in the factors' dtype."""
        h = self._down(x.reshape(-1, self.in_features), name)
        return torch.mm(h, self._bt[name]).mul_(self.adapters[name].scale).view(*x.shape[:-1], self.out_features)

    def _down(self, x2d: torch.Tensor, name: str) -> torch.Tensor:
        """``A x`` [N, r] in the factors' dtype."""
        A = self.adapters[name].A
        return F.linear(x2d if x2d.dtype == A.dtype else x2d.to(A.dtype), A)

    def forward(self, x: torch.Tensor, ctx: AdapterContext | None = None) -> torch.Tensor:
        return self.add_deltas(x, self.base.forward(x), ctx)  # not __call__: see decoder.call_linear

    def add_deltas(self, x: torch.Tensor, y: torch.Tensor, ctx: AdapterContext | None) -> torch.Tensor:
        """``y`` (the base layer's output on ``x``, which this may update in place) plus the deltas ``ctx`` asks for."""
        if ctx is None:
            return y
        if ctx.xlora is not None:
            return ctx.xlora.apply(self, x, y)
        if ctx.rows is not None:
            if len(ctx.rows) != x.shape[0]:
                raise ValueError(f"{len(ctx.rows)} row adapter sets for a batch of {x.shape[0]}")
            return self._rows_forward(x, y, ctx)
        names, native = self._plans.get(ctx.active) or self._plan(ctx.active)
        if not names:
            return y
        x2d = x.reshape(-1, self.in_features)
        m = x2d.shape[0]
        y2d = y.reshape(m, -1)  # a view (its data_ptr is y's) where y's rows allow it
        if native is not None and m <= 8 and y2d.data_ptr() == y.data_ptr() and row_stride(x2d) is not None \
                and row_stride(y2d) is not None:
            # the q8 runtime: one native call instead of two matmuls per adapter (their dispatch costs more
            # than the maths at a few tokens)
            lib, factors, plans = native
            plan = plans.get(m)
            if plan is None:
                plan = plans[m] = lora_plan([(i, A, Bt, s) for i in range(m) for A, Bt, s in factors])
            lib.lora_rows(y2d, x2d, plan)
            return y
        for name in names:
            y2d = _add_delta(y2d, self._down(x2d, name), self._bt[name], self.adapters[name].scale)
        return y2d.view(y.shape)

    def _rows_forward(self, x: torch.Tensor, y: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        """Each row its own adapters: each adapter runs on its rows only (LoRAX's BGMV, one gather per adapter)."""
        groups = ctx.row_groups()
        names = tuple(n for n in groups if n in self.adapters)
        if not names:
            return y
        lib = self._native()
        if lib is not None and row_stride(x) is not None and row_stride(y) is not None:
            # the q8 runtime, one token per row: one native call, each row only its own adapters' factors
            key = ("_native_rows", id(self))
            if key not in ctx.extra:  # per context and layer (None: a factor the kernel does not take)
                ctx.extra[key] = lora_plan(
                    [(i, self.adapters[n].A, self._bt[n], self.adapters[n].scale)
                     for i, row in enumerate(ctx.rows) for n in row if n in self.adapters]
                ) if all(self._fits_native(n) for n in names) else None
            if ctx.extra[key] is not None:
                return lib.lora_rows(y, x, ctx.extra[key])
        for name in names:
            ix = groups[name]
            if len(ix) == x.shape[0]:  # every row: no gather
                y = _add_to(y, self.delta(x, name))
            else:  # index_put with accumulate: index_add is pathologically slow on a busy CPU
                y = y.index_put((ix,), self.delta(x.index_select(0, ix), name).to(y.dtype), accumulate=True)
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


def _add_delta(y2d: torch.Tensor, h: torch.Tensor, Bt: torch.Tensor, scale: float) -> torch.Tensor:
    """``y2d + scale * (h @ Bt)``: one fused op when the dtypes agree (PEFT's order: the product, then the scale)."""
    if y2d.dtype == Bt.dtype:
        return torch.addmm(y2d, h, Bt, alpha=scale)
    return y2d + torch.mm(h, Bt).mul_(scale).to(y2d.dtype)


def _add_to(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return y.add_(d) if d.dtype == y.dtype else y + d.to(y.dtype)
