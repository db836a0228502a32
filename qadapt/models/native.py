"""The q8 runtime's fused native decode, applied to a built decoder as a transform (``kernels="q8"``).

:func:`apply` turns a :class:`~qadapt.models.decoder.Decoder`'s norms, blocks and itself into the
subclasses below (the modules stay the same objects, so adapter wrappers and the module tree are
untouched), and :func:`revert` turns them back. What they override are the decoder's own steps:

- :meth:`NativeBlock.project`: the linears on one input in one native call when all of them keep the
  8-row q8 layout (one activation quantization, one parallel region), their LoRA deltas in the same call;
- :meth:`NativeBlock.attend`: one new token per row: rotary, cache write and attention in one call;
- :meth:`NativeBlock.mlp`: norm, gate/up, SiLU, down, the deltas and the residual in one call;
- :meth:`NativeDecoder.layers`: a whole decode step (every layer) in one call when every layer has that
  shape, on a plan built once per cache and adapter set.

They talk to the quantized layers through :meth:`BaseLinear.x8_weight <qadapt.quant.base.BaseLinear.x8_weight>`
and to the adapter wrappers through :meth:`LoraLinear.native_entries
<qadapt.adapters.lora.LoraLinear.native_entries>`; the C side checks every plan it is given. Each step falls
back to the plain torch step it overrides whenever its conditions do not hold.
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.lora import LoraLinear, adapters_epoch
from ..quant.base import BaseLinear, X8Weight
from ..quant.native import _type_id, lora_plan, row_stride
from ..runtime.kv_cache import KVCache
from .decoder import PREFILL_CHUNK, Block, Decoder, RMSNorm, StepPlan

#: a cached prefill's chunk on the q8 runtime: its cost per token is flat past a few dozen rows, and these
#: chunks' activations stay small enough for the allocator to reuse them
NATIVE_PREFILL_CHUNK = 64


def apply(decoder: Decoder, lib: Any) -> None:
    """Run ``decoder``'s decode steps on the native kernels ``lib`` (``None``: :func:`revert`)."""
    if lib is None:
        return revert(decoder)
    for mod in decoder.modules():
        if type(mod) is RMSNorm:
            mod.__class__ = NativeRMSNorm
        elif type(mod) is Block and mod.standard:  # the fused step runs Llama-shaped blocks; others per op
            mod.__class__ = NativeBlock
            mod._groups = {}
        if isinstance(mod, (NativeRMSNorm, NativeBlock)):
            mod.lib = lib
    if type(decoder) is Decoder:
        decoder.__class__ = NativeDecoder
    decoder.lib = lib
    decoder._step_plans = weakref.WeakKeyDictionary()
    decoder.prefill_chunk = NATIVE_PREFILL_CHUNK


def revert(decoder: Decoder) -> None:
    """Back to the plain torch decoder."""
    for mod in decoder.modules():
        if type(mod) is NativeRMSNorm:
            mod.__class__ = RMSNorm
        elif type(mod) is NativeBlock:
            mod.__class__ = Block
    if type(decoder) is NativeDecoder:
        decoder.__class__ = Decoder
    decoder.prefill_chunk = PREFILL_CHUNK


def _bits(v: float) -> int:
    """A float's double bits as an int64 (how the native plans carry floats)."""
    return struct.unpack("<q", struct.pack("<d", v))[0]


def x8_weight(mod: nn.Module) -> X8Weight | None:
    """The 8-row layout under ``mod`` (through an adapter wrapper), or None."""
    base = mod.base if isinstance(mod, LoraLinear) else mod
    return base.x8_weight() if isinstance(base, BaseLinear) else None


class NativeRMSNorm(RMSNorm):
    lib: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.is_contiguous():
            return self.lib.rms_norm(x, self.weight, self.eps)  # float64 sum of squares: within 1e-6
        return super().forward(x)


@dataclass
class NativeStep(StepPlan):
    """A step plan with what the native attention needs when it runs this step."""

    native_pos: torch.Tensor | None = None  # each row's position (int64 [B])
    native_first: torch.Tensor | None = None  # ... and the first key it sees (a sliding window)


class NativeBlock(Block):
    lib: Any
    _groups: dict

    def project(self, roles: tuple[str, ...], h: torch.Tensor, ctx: Any) -> list[torch.Tensor]:
        mods, group = self._x8_group(roles)
        if group is None:
            return super().project(roles, h, ctx)
        plan, total, splits = group
        h2d = h.reshape(-1, h.shape[-1])
        lora = self._group_lora(roles, mods, splits, ctx, h2d.shape[0]) if row_stride(h2d) is not None else None
        if lora is not None:  # every wrapper's deltas in the same native call (or none to add)
            y = self.lib.matmul_x8_multi(plan, total, h.shape[-1], h2d, lora if lora.shape[0] else None)
            return [part.view(*h.shape[:-1], part.shape[-1]) for part in y.split(splits, dim=1)]
        y = self.lib.matmul_x8_multi(plan, total, h.shape[-1], h2d)
        outs = []
        for m, part in zip(mods, y.split(splits, dim=1)):
            part = part.view(*h.shape[:-1], part.shape[-1])
            outs.append(m.add_deltas(h, part, ctx) if isinstance(m, LoraLinear) else part)
        return outs

    def attend(self, q, k, v, step, cache):
        if getattr(step, "native_pos", None) is None or q.dtype != torch.float32:
            return super().attend(q, k, v, step, cache)
        cfg = self.cfg
        kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
        a = self.lib.attn_decode(q.contiguous(), k.contiguous(), v.contiguous(), step.cos, step.sin, kc, vc,
                                 step.native_pos, step.native_first, cfg.num_attention_heads,
                                 cfg.num_key_value_heads, cfg.head_dim)
        return a.view(q.shape[0], 1, -1)

    def mlp(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        if x.shape[-2] == 1 and x.dtype == torch.float32 and x.is_contiguous():
            fused = self._fused_mlp()
            lora = None if fused is None else self._mlp_lora(fused, ctx, x.numel() // x.shape[-1])
            if lora is not None:  # norm, gate/up, silu * up, down, their deltas and the residual: one call
                plan, ff, down, _ = fused
                return self.lib.mlp_x8(x, self.mlp_norm.weight, self.mlp_norm.eps, plan, ff, down.qtype,
                                       down.layout, lora[0] if lora[0].shape[0] else None,
                                       lora[1] if lora[1].shape[0] else None)
        return super().mlp(x, ctx)

    # ---- plans, cached until an adapter wraps (or unwraps) one of their linears
    def _x8_group(self, roles: tuple[str, ...]) -> tuple[tuple[nn.Module, ...], tuple | None]:
        """The linears ``roles`` and (plan, total rows, rows per layer) of one grouped native call, or None when
        one has no 8-row layout (or has a bias)."""
        mods = tuple(self.linears[r] for r in roles)
        group = self._groups.get(roles)
        if group is None or group[0] != mods:
            weights = [x8_weight(m) for m in mods]
            plan = None
            if all(w is not None for w in weights):
                splits = [w.out_features for w in weights]
                plan = (self.lib.x8_plan([(w.qtype, w.layout, w.out_features) for w in weights]), sum(splits), splits)
            group = self._groups[roles] = (mods, plan)
        return group

    def _group_lora(self, roles: tuple[str, ...], mods: tuple[nn.Module, ...], splits: list[int], ctx: Any,
                    m: int) -> torch.Tensor | None:
        """One native LoRA plan for the deltas of all of ``mods`` on a grouped call's output of ``m`` rows (each
        entry at its layer's columns), cached per adapter set and row count until an adapter is added or
        removed; None when one wrapper's deltas cannot run natively (then each adds its own)."""
        if m > 8:  # more rows: the per-adapter matmuls win
            return None
        epoch = adapters_epoch()
        # X-LoRA's scalings change every token: its plans are built per step, never cached
        xlora = getattr(ctx, "xlora", None) is not None
        key = (ctx.rows if ctx is not None and ctx.rows is not None else
               (ctx.active if ctx is not None else ()), m, xlora)
        cache = self._groups.get(("lora", roles))
        if cache is None or cache[0] != epoch or len(cache[1]) > 256:  # a server's ever-new row mixes
            cache = self._groups[("lora", roles)] = (epoch, {})
        if xlora:
            cache = (epoch, {})  # a throwaway: nothing kept
        if key in cache[1]:
            return cache[1][key]
        entries, col = [], 0
        for mod, n in zip(mods, splits):
            got = mod.native_entries(ctx, m) if isinstance(mod, LoraLinear) else []
            if got is None:
                cache[1][key] = None
                return None
            entries += [(*e, col) for e in got]
            col += n
        entries.sort(key=lambda e: (e[0], e[4]))  # (row, col) increasing: disjoint outputs run in parallel
        plan = cache[1][key] = lora_plan(entries)
        return plan

    def _fused_mlp(self):
        """(gate/up plan, ff, down's 8-row weight, the three linears) when the MLP can run as one native call:
        RMS norm, SiLU gate, gate, up and down on 8-row layouts without bias; else None."""
        lin = self.linears
        key = tuple(lin[r] for r in ("gate", "up", "down") if r in lin)
        cached = self._groups.get(("mlp",))
        if cached is None or cached[0] != key:
            fused = None
            if self.spec.act == "silu" and isinstance(self.mlp_norm, RMSNorm) and len(key) == 3:
                _, group = self._x8_group(("gate", "up"))
                down = x8_weight(key[2])
                if group is not None and down is not None:
                    fused = (group[0], key[0].out_features, down, key)
            cached = self._groups[("mlp",)] = (key, fused)
        return cached[1]

    def _mlp_lora(self, fused: tuple, ctx: Any, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The native LoRA plans of the fused MLP's gate/up and down for ``m`` rows, or None (not native)."""
        _, ff, down, mods = fused
        lgu = self._group_lora(("gate", "up"), mods[:2], [ff, ff], ctx, m)
        ld = self._group_lora(("down",), mods[2:], [down.out_features], ctx, m)
        return None if lgu is None or ld is None else (lgu, ld)

    def step_fields(self, ctx: Any, B: int, cache: KVCache) -> tuple[list[int], list] | None:
        """This layer's row of the native decode step's plan for ``B`` rows (and the tensors it points into, to
        keep alive), or None when the layer does not have that shape: RMS norms, separate q/k/v and o and the
        fused MLP all on 8-row q8 layouts, deltas the kernel takes."""
        lin, attn_norm, mlp_norm = self.linears, self.attn_norm, self.mlp_norm
        if "qkv" in lin or not isinstance(attn_norm, RMSNorm) or not all(r in lin for r in ("q", "k", "v", "o")):
            return None
        fused = self._fused_mlp()
        (qkv_mods, qkv), (o_mods, o) = self._x8_group(("q", "k", "v")), self._x8_group(("o",))
        cfg = self.cfg
        heads = [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
        if fused is None or qkv is None or o is None or list(qkv[2]) != heads:
            return None
        lq = self._group_lora(("q", "k", "v"), qkv_mods, qkv[2], ctx, B)
        lo = self._group_lora(("o",), o_mods, o[2], ctx, B)
        lm = self._mlp_lora(fused, ctx, B)
        if lq is None or lo is None or lm is None:
            return None
        gate_up, ff, down, _ = fused
        kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
        fields = [attn_norm.weight.data_ptr(), _bits(attn_norm.eps), qkv[0].data_ptr(), *qkv[2],
                  lq.shape[0], lq.data_ptr() if lq.shape[0] else 0, o[0].data_ptr(),
                  lo.shape[0], lo.data_ptr() if lo.shape[0] else 0, kc.data_ptr(), vc.data_ptr(), kc.shape[-2],
                  mlp_norm.weight.data_ptr(), _bits(mlp_norm.eps), gate_up.data_ptr(), ff, _type_id(down.qtype),
                  down.layout.data_ptr()]
        for plan in lm:
            fields += [plan.shape[0], plan.data_ptr() if plan.shape[0] else 0]
        qn, kn = self.q_norm, self.k_norm  # Qwen3's per-head norms (RMSNorm over head_dim), else none
        fields += [0, 0, 0, 0] if qn is None else [qn.weight.data_ptr(), _bits(qn.eps), kn.weight.data_ptr(),
                                                   _bits(kn.eps)]
        return fields, [qkv[0], o[0], lq, lo, gate_up, kc, vc, *lm]


class NativeDecoder(Decoder):
    lib: Any
    _step_plans: weakref.WeakKeyDictionary

    def step_plan(self, positions: torch.Tensor, n_keys: int | None, rope_top: int | None, cache: Any) -> StepPlan:
        base = super().step_plan(positions, n_keys, rope_top, cache)
        step = NativeStep(base.positions, base.mask, base.rope, base.cos, base.sin, base.local)
        B, T = positions.shape
        if self.rope is not None and T == 1 and isinstance(cache, KVCache) and cache.k[0].dtype == torch.float32 \
                and self.rope.dim % 2 == 0:
            step.native_pos = positions.reshape(B).to(torch.int64).contiguous()
            w = self.cfg.sliding_window
            step.native_first = (step.native_pos - (w - 1)).clamp_(min=0) if w else torch.zeros_like(step.native_pos)
            step.cos, step.sin = step.cos.contiguous(), step.sin.contiguous()
        return step

    def layers(self, x: torch.Tensor, step: StepPlan, cache: Any, ctx: Any) -> torch.Tensor:
        plans = self._native_step(ctx, x.shape[0], cache) if getattr(step, "native_pos", None) is not None else None
        if plans is None:
            return super().layers(x, step, cache, ctx)
        cfg, B = self.cfg, x.shape[0]  # every layer in one native call (the same calls as the loop)
        return self.lib.decode_layers(plans, x.reshape(B, -1).contiguous(), cfg.num_attention_heads,
                                      cfg.num_key_value_heads, cfg.head_dim, step.cos, step.sin, step.native_pos,
                                      step.native_first).view(B, 1, -1)

    def _native_step(self, ctx: Any, B: int, cache: KVCache) -> torch.Tensor | None:
        """The plan of the native decode step for ``B`` rows under ``ctx`` on ``cache``, or None (a layer of another
        shape). Kept per cache, keyed by the adapter set, X-LoRA's scalings and :func:`adapters_epoch` (a load,
        an unload, a wrap anywhere)."""
        if self.pos_embed is not None:
            return None
        xlora = getattr(ctx, "xlora", None)
        key = (ctx.rows if ctx is not None and ctx.rows is not None else (ctx.active if ctx is not None else ()),
               tuple(sorted(getattr(ctx, "alora", None) or ())), B, adapters_epoch(),
               # X-LoRA: the step's scalings are in the plan (new each granular step; fixed once non-granular)
               None if xlora is None else xlora.scalings.float().contiguous().numpy().tobytes())
        plans = self._step_plans.setdefault(cache, {})
        if key not in plans:
            if len(plans) > 16:
                plans.clear()
            rows, keep = [], []
            for blk in self.blocks:
                got = blk.step_fields(ctx, B, cache) if isinstance(blk, NativeBlock) else None
                if got is None:
                    plans[key] = None
                    return None
                rows.append(got[0])
                keep += got[1]
            plans[key] = (torch.tensor(rows, dtype=torch.int64), keep)
        got = plans[key]
        return None if got is None else got[0]


def step_plans(decoder: Decoder, cache: KVCache) -> dict:
    """The native decode-step plans built for ``cache`` (tests: which steps ran as one native call)."""
    return getattr(decoder, "_step_plans", {}).get(cache, {})
