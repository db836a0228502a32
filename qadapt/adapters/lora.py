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

    def row_plan(self, names: tuple[str, ...], batch: int, seq: int) -> "_RowPlan":
        """How the adapters ``names`` (stacked in this order) map onto the batch's tokens (cached per forward)."""
        key = ("_plan", names, batch, seq)
        plan = self.extra.get(key)
        if plan is None:
            tokens = [[b * seq + t for b in self.row_groups()[n].tolist() for t in range(seq)] for n in names]
            n, m, total = len(names), max(len(t) for t in tokens), batch * seq
            if m == 1 and n == total and [t[0] for t in tokens] == list(range(total)):
                plan = _RowPlan(n, 1, None, None, False)
            else:
                gather = torch.tensor([t + [total] * (m - len(t)) for t in tokens]).view(-1)
                scatter = torch.tensor([t + [0] * (m - len(t)) for t in tokens]).view(-1)
                plan = _RowPlan(n, m, gather, scatter, any(len(t) < m for t in tokens))
            self.extra[key] = plan
        return plan


@dataclass
class _Stack:
    """Several adapters' factors on one layer, stacked (built once per set, then cached).

    ``A`` [n, r, in] and ``Bt`` [n, r, out] (``scale * B.T``), zero-padded to the largest rank ``r``
    (zero rows add exact zeros). Viewed as [n*r, in] / [n*r, out], two matmuls sum every adapter's
    delta; as batches, ``bmm`` runs each adapter on its own rows only.
    """

    names: tuple[str, ...]
    A: torch.Tensor  # [n, r, in]
    Bt: torch.Tensor  # [n, r, out], scale folded in
    finite: bool  # no NaN/Inf in any factor (else rows on other adapters must not share the matmul)


@dataclass
class _RowPlan:
    """Which tokens each stacked adapter runs on, padded to ``m`` tokens per adapter (one per forward).

    ``gather`` [n*m] indexes the flattened tokens (index n_tokens: a zero row appended); ``scatter`` [n*m] is the
    token each result adds to (padding adds its exact zeros to token 0). Both None when adapter i runs
    on token i alone (each row on its own adapter, rows in adapter order): no copies at all.
    """

    n: int
    m: int
    gather: torch.Tensor | None
    scatter: torch.Tensor | None
    padded: bool


#: Stacked adapter sets kept per layer (each costs one copy of its adapters' factors on this layer).
STACK_CACHE_SIZE = 8


class LoraLinear(nn.Module):
    """``y = base(x) + sum_i scale_i * B_i(A_i(x))`` over the active adapters that have this layer.

    One active adapter costs two small matmuls on its own factors; several active adapters, or
    a batch whose rows use different adapters, are stacked once per set (:class:`_Stack`) so a
    forward still costs two matmuls per layer, whatever the number of adapters.
    """

    takes_context = True

    def __init__(self, base: nn.Module, path: str):
        super().__init__()
        self.base = base
        self.path = path
        self.in_features, self.out_features = base.in_features, base.out_features
        self.qtype = getattr(base, "qtype", "?")
        self.adapters: dict[str, LoraFactors] = {}
        #: per adapter, ``scale * B.T`` contiguous [r, out]: the layout addmm reads fastest (~2x a transposed B)
        self._bt: dict[str, torch.Tensor] = {}
        self._stacks: dict[tuple[str, ...], _Stack] = {}
        #: ctx.active -> (the names present here, the native one-adapter call's arguments or None)
        self._plans: dict[tuple[str, ...], tuple] = {}

    def _plan(self, active: tuple[str, ...]) -> tuple:
        names = tuple(n for n in active if n in self.adapters)
        native = None
        lib = getattr(self.base, "_lib", None) if getattr(self.base, "path", None) == "q8" else None
        if lib is not None and len(names) == 1:
            A, Bt = self.adapters[names[0]].A, self._bt[names[0]]
            if A.dtype == torch.float32 and A.shape[0] <= 256:
                native = (lib, A, Bt)
        plan = self._plans[active] = (names, native)
        return plan

    def add(self, name: str, f: LoraFactors) -> None:
        if f.A.shape[1] != self.in_features or f.B.shape[0] != self.out_features:
            raise AdapterError(
                f"adapter `{name}`: layer {self.path}: lora_A {tuple(f.A.shape)} / lora_B {tuple(f.B.shape)} do not "
                f"fit the base layer's [out={self.out_features}, in={self.in_features}]"
            )
        self.adapters[name] = f
        self._bt[name] = (f.B.T.to(f.A.dtype) * f.scale).contiguous()
        self._stacks = {k: v for k, v in self._stacks.items() if name not in k}
        self._plans = {}

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._bt.pop(name, None)
        self._stacks = {k: v for k, v in self._stacks.items() if name not in k}
        self._plans = {}

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        f = self.adapters[name]
        return (x.to(f.A.dtype) @ f.A.T) @ f.B.T * f.scale

    def stack(self, names: tuple[str, ...]) -> _Stack:
        """The stacked factors of ``names`` (all present on this layer), cached."""
        st = self._stacks.get(names)
        if st is None:
            fs = [self.adapters[n] for n in names]
            dtype, r = fs[0].A.dtype, max(f.A.shape[0] for f in fs)
            A = torch.zeros(len(fs), r, self.in_features, dtype=dtype)
            Bt = torch.zeros(len(fs), r, self.out_features, dtype=dtype)
            for i, (n, f) in enumerate(zip(names, fs)):
                A[i, : f.A.shape[0]] = f.A
                Bt[i, : f.A.shape[0]] = self._bt[n]
            st = _Stack(names, A, Bt, bool(A.isfinite().all()) and bool(Bt.isfinite().all()))
            if len(self._stacks) >= STACK_CACHE_SIZE:
                self._stacks.pop(next(iter(self._stacks)))
            self._stacks[names] = st
        return st

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
        if native is not None and x2d.shape[0] <= 8 and y.dtype == torch.float32 and x2d.is_contiguous() \
                and y.is_contiguous():
            # the q8 runtime: one native call instead of two matmuls (their dispatch costs more than the maths)
            lib, A, Bt = native
            return lib.lora_add(y, x2d, A, Bt)
        if len(names) == 1:  # no stacking: the adapter's own tensors
            A = self.adapters[names[0]].A
            return _add_delta(y, F.linear(x2d if x2d.dtype == A.dtype else x2d.to(A.dtype), A), self._bt[names[0]])
        st = self.stack(names)
        n, r, _ = st.A.shape
        h = F.linear(x2d if x2d.dtype == st.A.dtype else x2d.to(st.A.dtype), st.A.view(n * r, -1))
        return _add_delta(y, h, st.Bt.view(n * r, -1))

    def _rows_forward(self, x: torch.Tensor, y: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        """Each row its own adapters: one ``bmm`` pair over the stacked adapters, each on its rows' tokens."""
        groups = ctx.row_groups()
        # sorted: the same stack serves a batch whatever its rows' order; building one copies the factors once,
        # about what one forward reads of them, so a batch whose adapter set changes pays one such copy
        names = tuple(sorted(n for n in groups if n in self.adapters))
        if not names:
            return y
        if getattr(self.base, "path", None) == "q8" and x.dim() == 3 and x.shape[1] == 1 and x.dtype == y.dtype \
                == torch.float32 and x.is_contiguous() and y.is_contiguous() and all(
                    self.adapters[n].A.dtype == torch.float32 and self.adapters[n].A.shape[0] <= 256 for n in names):
            # the q8 runtime, one token per row: one native call, each row only its own adapters' factors
            key = ("_native_rows", id(self))
            cached = ctx.extra.get(key)
            if cached is None:  # per forward and layer; holds the factors it points at
                pairs = [(i, self.adapters[n].A, self._bt[n]) for i, row in enumerate(ctx.rows) for n in row
                         if n in self.adapters]
                plan = torch.tensor([[i, A.data_ptr(), Bt.data_ptr(), A.shape[0]] for i, A, Bt in pairs],
                                    dtype=torch.int64)
                cached = ctx.extra[key] = (plan, pairs)
            return self.base._lib.lora_rows(y, x, cached[0])
        st = self.stack(names)
        if not st.finite:  # a NaN/Inf adapter must not reach rows that do not use it: group by group
            for name in names:
                ix = groups[name]
                # index_put with accumulate: index_add is pathologically slow on a busy CPU
                y = y.index_put((ix,), self.delta(x.index_select(0, ix), name).to(y.dtype), accumulate=True)
            return y
        x2d = x.reshape(-1, self.in_features)
        if x2d.dtype != st.A.dtype:
            x2d = x2d.to(st.A.dtype)
        plan = ctx.row_plan(names, x.shape[0], x2d.shape[0] // x.shape[0])
        if plan.gather is None:
            xg = x2d.view(plan.n, 1, -1)
        elif plan.padded:
            xg = F.pad(x2d, (0, 0, 0, 1))[plan.gather].view(plan.n, plan.m, -1)
        else:
            xg = x2d[plan.gather].view(plan.n, plan.m, -1)
        out = torch.bmm(torch.bmm(xg, st.A.transpose(1, 2)), st.Bt).view(-1, self.out_features)
        y2d = y.reshape(-1, self.out_features)
        if out.dtype != y2d.dtype:
            out = out.to(y2d.dtype)
        if plan.scatter is None:
            return (y2d + out).view(y.shape)
        return y2d.index_put((plan.scatter,), out, accumulate=True).view(y.shape)

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


def _add_delta(y: torch.Tensor, h: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """``y + h @ Bt`` with h [N, R] for y [..., out] (N rows): one fused op when the dtypes agree."""
    y2d = y.reshape(-1, Bt.shape[1])
    if y2d.dtype == Bt.dtype:
        return torch.addmm(y2d, h, Bt).view(y.shape)
    return y + (h @ Bt).to(y.dtype).view(y.shape)
