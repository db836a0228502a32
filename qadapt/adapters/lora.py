"""Full-precision LoRA deltas on top of any base linear, quantized or not.

``LoraLinear`` wraps (never subclasses) a :class:`~qadapt.quant.base.BaseLinear`
and keeps each loaded adapter's factors for that layer. Which adapters apply is
an argument of every forward (an :class:`AdapterContext`), not state on the
layer, so switching adapters costs nothing and concurrent requests can use
different ones.

Beyond plain LoRA, as PEFT 0.21 applies them: ``lora_bias`` (a bias on B, scaled
with it), DoRA (``delta = (g - 1) * base(x) + g * scale * B A x`` with
``g = m / ||W + scale B A||`` per output row, ``W`` the dequantized base weight,
computed once when the adapter is attached), aLoRA (the delta only on the tokens
from the adapter's invocation on, :attr:`AdapterContext.alora`), and saved
modules: an adapter's own weight and bias for the layer (``modules_to_save``, a
targeted output layer's ``base_layer``, ``bias="all"``), which replace the base's
for the rows that use the adapter and no others.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AdapterError
from ..quant.native import LORA_DTYPES, lora_plan, row_stride
from .context import AdapterContext  # noqa: F401  (re-exported: where callers have always imported it)

log = logging.getLogger(__name__)


_EPOCH = [0]


def adapters_epoch() -> int:
    """Bumped whenever any layer gains or loses an adapter (or a wrapper): plans holding factor addresses
    built for a whole model (the decoder's one-call decode step) key on it."""
    return _EPOCH[0]


@dataclass(frozen=True)
class LoraFactors:
    """One adapter on one layer: ``delta(x) = scale * (B(A(x)) + bias)``, or DoRA's with ``dora``."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    bias: torch.Tensor | None = None  # lora_B's bias [out] (lora_bias)
    magnitude: torch.Tensor | None = None  # DoRA's m [out], as saved
    dora: torch.Tensor | None = None  # m / ||W + scale B A|| per output row, once attached to its base layer

    @property
    def plain(self) -> bool:
        return self.bias is None and self.magnitude is None


@dataclass(frozen=True)
class SavedModule:
    """An adapter's own copy of a module's parameters (replacing the base's for the adapter's rows)."""

    weight: torch.Tensor | None = None  # [out, in] (a linear) or [vocab, hidden] (the embedding)
    bias: torch.Tensor | None = None  # [out]
    row_ids: torch.Tensor | None = None  # some output rows only (a tied output layer's trainable tokens)
    row_weight: torch.Tensor | None = None  # [len(row_ids), in]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias, self.row_ids, self.row_weight)
                   if t is not None)


@dataclass(frozen=True)
class EmbeddingParts:
    """What an adapter does to the token embedding: its own table, new or retrained token rows
    (``trainable_token_indices``), and LoRA on the embedding (``lora_embedding_A/B``)."""

    table: torch.Tensor | None = None  # [vocab, hidden] replacing the base's
    token_ids: torch.Tensor | None = None  # [n] ids whose rows are replaced by ``token_rows``
    token_rows: torch.Tensor | None = None  # [n, hidden]
    A: torch.Tensor | None = None  # [r, vocab]
    B: torch.Tensor | None = None  # [hidden, r]
    scale: float = 1.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.table, self.token_ids, self.token_rows, self.A, self.B)
                   if t is not None)


@dataclass
class LoraAdapter:
    """A loaded adapter: its name, where it came from, and its factors per module path."""

    name: str
    source: str
    folder: Path
    config: Any  # peft_format.LoraAdapterConfig
    factors: dict[str, LoraFactors]
    saved: dict[str, SavedModule] = field(default_factory=dict)  # module path -> its saved parameters
    embedding: EmbeddingParts | None = None
    alora: tuple[int, ...] | None = None  # aLoRA's invocation token ids

    @property
    def nbytes(self) -> int:
        factors = sum(t.numel() * t.element_size() for f in self.factors.values()
                      for t in (f.A, f.B, f.bias, f.magnitude, f.dora) if t is not None)
        return factors + sum(m.nbytes for m in self.saved.values()) + (self.embedding.nbytes if self.embedding else 0)

    @functools.cached_property
    def general(self) -> bool:
        """Whether this adapter needs more than ``scale * B A x`` per layer (the device slots' kernel): DoRA, a LoRA
        bias, saved modules (``modules_to_save``, trainable tokens on a tied head) or aLoRA's per-token start.
        Computed once (an adapter's parts do not change after it is built)."""
        return self.alora is not None or bool(self.saved) or any(not f.plain for f in self.factors.values())

    def alora_start(self, ids) -> int | None:
        """Where this aLoRA adapter starts applying in ``ids`` (PEFT's ``calculate_alora_offsets``: the start
        of the last occurrence of the invocation tokens); None: nowhere (the base model). Not an aLoRA: 0."""
        if self.alora is None:
            return 0
        inv, ids = list(self.alora), list(ids)
        for i in range(len(ids) - len(inv), -1, -1):
            if ids[i:i + len(inv)] == inv:
                return i
        return None


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
        self.saved: dict[str, SavedModule] = {}  # adapters' own weight/bias for this layer
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
        f = self.adapters.get(name)
        return f is not None and f.plain and name not in self.saved and f.A.dtype in LORA_DTYPES \
            and f.A.is_contiguous() and f.A.shape[0] <= 256

    def _general_needed(self, names, ctx: AdapterContext) -> bool:
        """Whether an adapter here needs more than ``scale * B A x`` (saved modules, DoRA, a bias, aLoRA)."""
        return any(n in self.saved or (n in self.adapters and not self.adapters[n].plain) or n in ctx.alora
                   for n in names)

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
        if f.magnitude is not None and f.dora is None:
            f = self._with_dora(name, f)
        bt = f.B.T
        if bt.dtype != f.A.dtype or not bt.is_contiguous():
            bt = bt.to(f.A.dtype).contiguous()
        self.adapters[name] = f
        self._bt[name] = bt
        self._plans = {}
        _EPOCH[0] += 1

    def _with_dora(self, name: str, f: LoraFactors) -> LoraFactors:
        """DoRA's ``g = m / ||W + scale B A||`` per output row, ``W`` this base layer's dequantized weight in
        float32 (PEFT's get_weight_norm on the dequantized layer), computed once."""
        from dataclasses import replace

        if f.magnitude.shape != (self.out_features,):
            raise AdapterError(f"adapter `{name}`: layer {self.path}: DoRA magnitude {tuple(f.magnitude.shape)} "
                               f"does not fit the layer's {self.out_features} outputs")
        with torch.no_grad():
            saved = self.saved.get(name)
            w = saved.weight if saved is not None and saved.weight is not None else self.base.dequantize(torch.float32)
            w = w.float() + f.scale * (f.B.float() @ f.A.float())
            norm = torch.linalg.norm(w, dim=1)
            del w
        return replace(f, dora=(f.magnitude.float() / norm).to(f.A.dtype))

    def add_saved(self, name: str, m: SavedModule) -> None:
        """An adapter's own weight and/or bias for this layer (its rows use them instead of the base's)."""
        if m.weight is not None and tuple(m.weight.shape) != (self.out_features, self.in_features):
            raise AdapterError(f"adapter `{name}`: layer {self.path}: saved weight {tuple(m.weight.shape)} does not "
                               f"fit the base layer's [{self.out_features}, {self.in_features}]")
        if m.bias is not None and tuple(m.bias.shape) != (self.out_features,):
            raise AdapterError(f"adapter `{name}`: layer {self.path}: saved bias {tuple(m.bias.shape)} does not fit "
                               f"the layer's {self.out_features} outputs")
        self.saved[name] = m
        self._plans = {}
        _EPOCH[0] += 1

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._bt.pop(name, None)
        self.saved.pop(name, None)
        self._plans = {}
        _EPOCH[0] += 1

    def has(self, name: str) -> bool:
        return name in self.adapters or name in self.saved

    def native_entries(self, ctx: AdapterContext | None, m: int) -> list[tuple] | None:
        """This layer's deltas on ``m`` rows under ``ctx`` as native LoRA entries (row, A, Bt, scale), for a
        call shared with the layers beside it (:meth:`qadapt.models.native.NativeBlock.project`); None
        when the native kernel cannot take them (X-LoRA, no q8 base, a factor it does not take)."""
        if ctx is None:
            return []
        if self._native() is None:
            return None
        if ctx.xlora is not None:
            return ctx.xlora.native_entries(self, m)
        if ctx.rows is not None:
            if len(ctx.rows) != m:
                return None
            pairs = [(i, n) for i, row in enumerate(ctx.rows) for n in row if self.has(n)]
        else:
            pairs = [(i, n) for i in range(m) for n in ctx.active if self.has(n)]
        if not all(self._fits_native(n) and n not in ctx.alora for _, n in pairs):
            return None
        return [(i, self.adapters[n].A, self._bt[n], self.adapters[n].scale) for i, n in pairs]

    def delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scale * B(A(x))`` for one adapter, in the factors' compute dtype (:func:`wide`)."""
        h = self._down(x.reshape(-1, self.in_features), name)
        bt = on(wide(self._bt[name]), x.device)
        return torch.mm(h, bt).mul_(self.adapters[name].scale).view(*x.shape[:-1], self.out_features)

    def _down(self, x2d: torch.Tensor, name: str) -> torch.Tensor:
        """``A x`` [N, r] in the factors' compute dtype."""
        A = on(wide(self.adapters[name].A), x2d.device)
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
        here = [n for n in ctx.active if self.has(n)]
        if here and self._general_needed(here, ctx):
            return self._general(x, y, ctx, [(n, None) for n in here])
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
            y2d = _add_delta(y2d, self._down(x2d, name), wide(self._bt[name]), self.adapters[name].scale)
        return y2d.view(y.shape)

    def _rows_forward(self, x: torch.Tensor, y: torch.Tensor, ctx: AdapterContext) -> torch.Tensor:
        """Each row its own adapters: each adapter runs on its rows only (LoRAX's BGMV, one gather per adapter)."""
        groups = ctx.row_groups()
        names = tuple(n for n in groups if self.has(n))
        graph = ctx.extra.get("graph", False)  # a captured step replays for other rows: every layer takes its slots
        if not names and not graph:
            return y
        slots = ctx.extra.get("slots")
        if slots is not None:  # device slots: one gathered kernel pair for the rows of plain LoRA adapters
            bank, indices = slots
            if indices:
                if x.dim() == 3 and x.shape[1] > 1:
                    indices = [ix.repeat_interleave(x.shape[1]) for ix in indices]
                y2d = y.reshape(-1, self.out_features)
                if not y2d.is_contiguous():
                    y2d = y2d.contiguous()
                y = bank.apply(self, x.reshape(-1, self.in_features), y2d, indices).view(y.shape)
            general = ctx.extra.get("general_rows")  # the other rows: each adapter of theirs in order, as on CPU
            if general:
                pairs = [(n, general[n]) for n in names if n in general]
                return self._general(x, y, ctx, [(n, None if len(ix) == x.shape[0] else ix) for n, ix in pairs])
            return y
        if self._general_needed(names, ctx):
            return self._general(x, y, ctx, [(n, None if len(groups[n]) == x.shape[0] else groups[n])
                                             for n in names])
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

    def _general(self, x: torch.Tensor, y: torch.Tensor, ctx: AdapterContext,
                 pairs: list[tuple[str, torch.Tensor | None]]) -> torch.Tensor:
        """Adapters beyond plain LoRA, each on its rows (``ix``; None: all): first the saved modules replace
        the base output of their rows, then every delta is added (DoRA's scaled against the output so far,
        as PEFT does; aLoRA's only on the tokens from its invocation on)."""
        shape = y.shape
        x3 = x if x.dim() == 3 else x.unsqueeze(1)
        y3 = y.reshape(x3.shape[0], x3.shape[1], self.out_features)
        base_bias = getattr(self.base, "bias", None)
        for name, ix in pairs:
            sv = self.saved.get(name)
            if sv is None:
                continue
            if sv.weight is not None:
                xs = _rows(x3, ix)
                bias = sv.bias if sv.bias is not None else base_bias
                new = F.linear(xs.to(sv.weight.dtype), sv.weight, None if bias is None else bias.to(sv.weight.dtype))
            elif sv.row_ids is not None:
                new = _rows(y3, ix).clone()
                part = F.linear(_rows(x3, ix).to(sv.row_weight.dtype), sv.row_weight)
                if base_bias is not None:
                    part = part + base_bias[sv.row_ids].to(part.dtype)
                new[..., sv.row_ids] = part.to(new.dtype)
            else:
                new = _rows(y3, ix) + (sv.bias - (base_bias if base_bias is not None else 0)).to(y3.dtype)
            y3 = new.to(y3.dtype) if ix is None else y3.index_copy(0, ix, new.to(y3.dtype))
        for name, ix in pairs:
            f = self.adapters.get(name)
            if f is None:
                continue
            d = self.delta(_rows(x3, ix), name)
            if f.bias is not None:
                d = d + f.scale * on(f.bias, d.device).to(d.dtype)
            if f.dora is not None:
                sv = self.saved.get(name)
                bias = sv.bias if sv is not None and sv.bias is not None else base_bias
                ys = _rows(y3, ix).to(d.dtype)
                base = ys - bias.to(d.dtype) if bias is not None else ys
                g = on(f.dora, d.device)
                d = g * d + (g - 1) * base
            mask = ctx.token_mask(name, ix)
            if mask is not None:
                d = d * mask.unsqueeze(-1).to(d.dtype)
            y3 = _add_to(y3, d) if ix is None else y3.index_put((ix,), d.to(y3.dtype), accumulate=True)
        return y3.reshape(shape)

    # ---- merging (dense bases only): fold the deltas into the weight, restore it exactly
    def merge(self, names: tuple[str, ...]) -> None:
        special = [n for n in names if n in self.saved or (n in self.adapters and not self.adapters[n].plain)]
        if special:
            raise AdapterError(f"{self.path}: adapter `{special[0]}` carries more than LoRA factors here (DoRA, a "
                               "bias or a saved module); merging it is not supported: apply it unmerged")
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


def wide(t: torch.Tensor) -> torch.Tensor:
    """A factor as torch computes with it: float32 for an adapter file's bf16/fp16 factors (held as they are,
    for the native kernel to stream half the bytes; PEFT upcasts them to a float32 model's dtype), else as held."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _add_delta(y2d: torch.Tensor, h: torch.Tensor, Bt: torch.Tensor, scale: float) -> torch.Tensor:
    """``y2d + scale * (h @ Bt)``: one fused op when the dtypes agree (PEFT's order: the product, then the scale)."""
    if y2d.dtype == Bt.dtype:
        return torch.addmm(y2d, h, Bt, alpha=scale)
    return y2d + torch.mm(h, Bt).mul_(scale).to(y2d.dtype)


def on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: a plain adapter's host factors, in a device batch row that runs the general path
    (its other adapters are DoRA, saved modules or aLoRA, which sit on the device from attach)."""
    return t if t.device == device else t.to(device, non_blocking=True)


def _rows(t: torch.Tensor, ix: torch.Tensor | None) -> torch.Tensor:
    return t if ix is None else t.index_select(0, ix.to(t.device))


def _add_to(y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return y.add_(d) if d.dtype == y.dtype else y + d.to(y.dtype)
