"""One decoder for every family: a whole forward pass readable in one screen.

The linears come from the loader as :class:`~qadapt.quant.base.BaseLinear`
(quantized or dense) or adapter wrappers around them, keyed by their role from
the layer map (q, k, v, o, qkv, gate, up, gate_up, down). What differs between
families is the spec (norm, activation, positions) and which roles exist.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.lora import adapters_epoch
from ..quant.native import _type_id as native_type_id, lora_plan, row_stride
from ..runtime.kv_cache import KVCache
from .config import ModelConfig
from .family import FamilySpec
from .rope import RopeSpec, inv_freq


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps
        self.native: Any = None  # the native kernels, when the model runs kernels="q8" (Decoder.use_native_ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None and x.dtype == torch.float32 and x.is_contiguous():
            return self.native.rms_norm(x, self.weight, self.eps)  # float64 sum of squares: within 1e-6
        if x.dtype == torch.float32:  # one fused op, the same float32 formula (and bits) as below
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps).to(x.dtype)


def make_norm(spec: FamilySpec, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> nn.Module:
    return RMSNorm(weight, eps) if spec.norm == "rms" else LayerNorm(weight, bias, eps)


class Rotary(nn.Module):
    """RoPE in transformers' half-split layout (the loader undoes llama.cpp's q/k row permutation).

    The frequencies and the cos/sin scale come from the config's :class:`~qadapt.models.rope.RopeSpec`
    (every scaling transformers implements). Scalings whose frequencies depend on how far a forward's
    positions reach (dynamic NTK, LongRoPE's long set) are chosen per forward from its last position, as
    transformers does per call; the others use one table for every position.
    """

    def __init__(self, spec: RopeSpec, max_pos: int):
        super().__init__()
        self.spec, self.dim, self.max_pos = spec, spec.dim, max_pos
        self._tables: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    def _variant(self, top: int) -> Any:
        """The key of the frequency set a forward reaching position ``top - 1`` uses."""
        s = self.spec
        if s.kind == "longrope":
            return "long" if top > s.original else "short"
        if s.kind == "dynamic" and top > s.max_positions:
            return top
        return "base"

    def _table(self, key: Any, top: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [n, dim] for positions 0..n-1 (grown, never rebuilt per token)."""
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < n:
            inv, scale = inv_freq(self.spec, top)
            rows = n if isinstance(key, int) else max(n, self.max_pos)  # a dynamic length: just what it needs
            t = torch.arange(rows, dtype=torch.int64).float()
            freqs = torch.outer(t, inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin() * scale
            # rotate_half(x) * sin == swap_halves(x) * [-sin[:half], sin[half:]] exactly (negation commutes)
            half = self.dim // 2
            sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
            cached = (emb.cos() * scale, sin)
            if isinstance(key, int):
                self._tables = {k: v for k, v in self._tables.items() if not isinstance(k, int)}
            self._tables[key] = cached
        return cached

    def tables(self, positions: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin [B, T, 1, dim] at ``positions`` (once per forward, shared by every layer).

        ``top``: one past the last position the whole forward reaches (a chunked prefill passes the whole
        prompt's, so every chunk uses the frequencies of the forward it is part of)."""
        if top is None:
            top = int(positions.max()) + 1
        n = int(positions.max()) + 1
        key = self._variant(top)
        cos, sin = self._table(key, top, n * 2 if n > self.max_pos and not isinstance(key, int) else n)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated by :meth:`tables`' cos/sin (transformers' ``x*cos + rotate_half(x)*sin``)."""
        B, T, H, D = x.shape
        half = self.dim // 2
        if self.dim == D and x.dtype == torch.float32:
            swapped = x.reshape(B, T, H, 2, half).flip(3).reshape(B, T, H, D)
            return x * cos + swapped * sin
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        swapped = rot.reshape(B, T, H, 2, half).flip(3).reshape(B, T, H, self.dim)
        out = rot.float() * cos + swapped.float() * sin
        return torch.cat((out.to(x.dtype), rest), dim=-1) if rest.numel() else out.to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D], positions [B, T]."""
        return self.apply(x, *self.tables(positions))


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


def call_linear(m: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Adapter wrappers take the per-forward context (active adapters, X-LoRA scalings); base layers don't.

    Layers inside the decoder are called through ``forward`` (here and in the blocks): ``Module.__call__``'s
    hook machinery costs a few microseconds a call, ~10 calls per block and token, and no hooks are used."""
    return m.forward(x, ctx) if getattr(m, "takes_context", False) else m.forward(x)


class Block(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        spec: FamilySpec,
        linears: dict[str, nn.Module],
        attn_norm: nn.Module,
        mlp_norm: nn.Module,
        qkv_split: tuple[int, int, int] | None,
        layer_idx: int,
    ):
        super().__init__()
        self.cfg, self.spec, self.layer_idx = cfg, spec, layer_idx
        self.linears = nn.ModuleDict(linears)
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.qkv_split = qkv_split
        self.native: Any = None  # see Decoder.use_native_ops
        self._groups: dict[tuple[str, ...], tuple] = {}
        # plain references for the per-token path (a submodule attribute goes through Module.__getattr__,
        # ~1 us each, a few hundred per token); the ModuleDict stays the one adapters wrap entries of
        self.__dict__["_fast"] = (self.linears, attn_norm, mlp_norm)

    def forward(self, x: torch.Tensor, step: "StepPlan", cache: Any, ctx: Any) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        lin, attn_norm, _ = self._fast
        h = attn_norm.forward(x)
        if "qkv" in lin:
            q, k, v = call_linear(lin["qkv"], h, ctx).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self._same_input(("q", "k", "v"), h, ctx)
        if step.native_pos is not None and q.dtype == torch.float32:
            # one new token of one sequence: rotary, cache write and attention in one native call
            kc, vc = cache.k[self.layer_idx], cache.v[self.layer_idx]
            a = self.native.attn_decode(q.contiguous(), k.contiguous(), v.contiguous(), step.cos, step.sin, kc, vc,
                                        step.native_pos, step.native_first, H, Hkv, D).view(B, 1, H * D)
            return self._mlp(x + self._same_input(("o",), a, ctx)[0], ctx)  # o and its deltas: one call
        q = q.view(B, T, H, D)
        k = k.view(B, T, Hkv, D)
        v = v.view(B, T, Hkv, D)
        if step.rope is not None:
            q, k = step.rope.apply(q, step.cos, step.sin), step.rope.apply(k, step.cos, step.sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, step.positions, k, v)  # [B, Hkv, S, D]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if T == 1:
            # one query per row: a KV head's H/Hkv query heads are the rows of one [rep, D] query
            # (no copies of the keys per query head); the mask [B, 1, 1, S] broadcasts over them
            a = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=step.mask)
            a = a.reshape(B, 1, H * D)
        else:
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=step.mask, enable_gqa=H != Hkv)
            a = a.transpose(1, 2).reshape(B, T, H * D)
        return self._mlp(x + call_linear(lin["o"], a, ctx), ctx)

    def _fused_mlp(self):
        """:func:`_fused_mlp_plan`, cached until an adapter wraps (or unwraps) one of the MLP's linears."""
        lin = self._fast[0]
        key = tuple(lin[r] for r in ("gate", "up", "down") if r in lin)
        cached = self._groups.get(("mlp",))
        if cached is None or cached[0] != key:
            cached = self._groups[("mlp",)] = (key, _fused_mlp_plan(self))
        return cached[1]

    def _same_input(self, roles: tuple[str, ...], h: torch.Tensor, ctx: Any) -> list[torch.Tensor]:
        """The linears ``roles`` on the same input ``h``: with the native ops, when all of them are 8-row
        q8 layers (adapter wrappers around them included), one grouped native call for the base outputs
        (one activation quantization, one parallel region), then each wrapper's deltas."""
        lin = self._fast[0]
        if self.native is not None:
            mods, group = self._x8_group(roles)
            if group is not None:
                plan, total, splits = group
                h2d = h.reshape(-1, h.shape[-1])
                lora = self._group_lora(roles, mods, splits, ctx, h2d.shape[0]) if row_stride(h2d) is not None else None
                if lora is not None:  # every wrapper's deltas in the same native call (or none to add)
                    y = self.native.matmul_x8_multi(plan, total, h.shape[-1], h2d, lora if lora.shape[0] else None)
                    return [part.view(*h.shape[:-1], part.shape[-1]) for part in y.split(splits, dim=1)]
                y = self.native.matmul_x8_multi(plan, total, h.shape[-1], h2d)
                outs = []
                for m, part in zip(mods, y.split(splits, dim=1)):
                    part = part.view(*h.shape[:-1], part.shape[-1])
                    outs.append(m.add_deltas(h, part, ctx) if hasattr(m, "add_deltas") else part)
                return outs
        return [call_linear(lin[r], h, ctx) for r in roles]

    def _x8_group(self, roles: tuple[str, ...]) -> tuple[tuple[nn.Module, ...], tuple | None]:
        """The linears ``roles`` and their grouped native plan (:func:`_x8_group`), cached until one is wrapped."""
        lin = self._fast[0]
        mods = tuple(lin[r] for r in roles)
        group = self._groups.get(roles)
        if group is None or group[0] != mods:
            group = self._groups[roles] = (mods, _x8_group(self.native, mods))
        return group

    def _group_lora(self, roles: tuple[str, ...], mods: tuple[nn.Module, ...], splits: list[int], ctx: Any,
                    m: int) -> torch.Tensor | None:
        """One native LoRA plan for the deltas of all of ``mods`` on a grouped call's output of ``m`` rows (each
        entry at its layer's columns), cached per adapter set and row count until an adapter is added or
        removed; None when one wrapper's deltas cannot run natively (then each adds its own)."""
        if m > 8:  # more rows: the per-adapter matmuls win
            return None
        epoch = adapters_epoch()
        key = (ctx.rows if ctx is not None and ctx.rows is not None else
               (ctx.active if ctx is not None else ()), m, getattr(ctx, "xlora", None) is not None)
        cache = self._groups.get(("lora", roles))
        if cache is None or cache[0] != epoch or len(cache[1]) > 256:  # a server's ever-new row mixes
            cache = self._groups[("lora", roles)] = (epoch, {})
        if key in cache[1]:
            return cache[1][key]
        entries, col = [], 0
        for mod, n in zip(mods, splits):
            got = mod.native_entries(ctx, m) if hasattr(mod, "native_entries") else []
            if got is None:
                cache[1][key] = None
                return None
            entries += [(*e, col) for e in got]
            col += n
        entries.sort(key=lambda e: (e[0], e[4]))  # (row, col) increasing: disjoint outputs run in parallel
        plan = cache[1][key] = lora_plan(entries)
        return plan

    def native_step_fields(self, ctx: Any, B: int, cache: KVCache) -> tuple[list[int], list] | None:
        """This layer's row of :meth:`NativeKernels.decode_layers`' plan for a decode step of ``B`` rows
        (and the tensors it points into, to keep alive), or None when the layer does not have that shape:
        RMS norms, separate q/k/v and o and the fused MLP all on 8-row q8 layouts, deltas the kernel takes."""
        lin, attn_norm, mlp_norm = self._fast
        if self.native is None or "qkv" in lin or not isinstance(attn_norm, RMSNorm) \
                or not all(r in lin for r in ("q", "k", "v", "o")):
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
                  mlp_norm.weight.data_ptr(), _bits(mlp_norm.eps), gate_up.data_ptr(), ff, native_type_id(down.qtype),
                  down._x8.data_ptr()]
        for plan in lm:
            fields += [plan.shape[0], plan.data_ptr() if plan.shape[0] else 0]
        return fields, [qkv[0], o[0], lq, lo, gate_up, kc, vc, *lm]

    def _mlp_lora(self, fused: tuple, ctx: Any, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The native LoRA plans of the fused MLP's gate/up and down for ``m`` rows, or None (not native)."""
        _, ff, down, mods = fused
        lgu = self._group_lora(("gate", "up"), mods[:2], [ff, ff], ctx, m)
        ld = self._group_lora(("down",), mods[2:], [down.out_features], ctx, m)
        return None if lgu is None or ld is None else (lgu, ld)

    def _mlp(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        lin, _, mlp_norm = self._fast
        if self.native is not None and x.shape[-2] == 1 and x.dtype == torch.float32 and x.is_contiguous():
            fused = self._fused_mlp()
            lora = None if fused is None else self._mlp_lora(fused, ctx, x.numel() // x.shape[-1])
            if lora is not None:  # norm, gate/up, silu * up, down, their deltas and the residual: one native call
                plan, ff, down, _ = fused
                return self.native.mlp_x8(x, mlp_norm.weight, mlp_norm.eps, plan, ff, down.qtype, down._x8,
                                          lora[0] if lora[0].shape[0] else None, lora[1] if lora[1].shape[0] else None)
        h = mlp_norm.forward(x)
        if "gate_up" in lin:
            gate, up = call_linear(lin["gate_up"], h, ctx).chunk(2, dim=-1)
            h = _act(self.spec.act, gate) * up
        elif "gate" in lin:
            gate, up = self._same_input(("gate", "up"), h, ctx)
            h = _act(self.spec.act, gate) * up
        else:
            h = _act(self.spec.act, call_linear(lin["up"], h, ctx))
        return x + call_linear(lin["down"], h, ctx)


def _bits(v: float) -> int:
    """A float's double bits as an int64 (how the native plans carry floats)."""
    return struct.unpack("<q", struct.pack("<d", v))[0]


def _fused_mlp_plan(blk: "Block"):
    """(gate/up plan, ff, down's base layer, the three linears) when a block's MLP can run as one native call:
    RMS norm, SiLU gate, and gate, up, down 8-row q8 layers without bias (adapter wrappers around them
    included: their deltas go in the same call, :meth:`Block._mlp_lora`); else None."""
    lin = blk.linears
    if blk.spec.act != "silu" or not isinstance(blk.mlp_norm, RMSNorm) or not all(r in lin for r in ("gate", "up", "down")):
        return None
    mods = (lin["gate"], lin["up"], lin["down"])
    group = _x8_group(blk.native, mods[:2])
    down = getattr(mods[2], "base", mods[2])
    if group is None or getattr(down, "_x8", None) is None or down.bias is not None:
        return None
    return group[0], mods[0].out_features, down, mods


def _x8_group(lib: Any, mods: tuple[nn.Module, ...]):
    """(plan, total rows, rows per layer) for :meth:`Block._same_input`, or None when a base layer has no
    8-row layout (or has a bias)."""
    bases = [getattr(m, "base", m) for m in mods]
    if not all(getattr(b, "_x8", None) is not None and getattr(b, "bias", 1) is None for b in bases):
        return None
    plan = lib.x8_plan([(b.qtype, b._x8, b.out_features) for b in bases])
    splits = [b.out_features for b in bases]
    return plan, sum(splits), splits


@dataclass
class StepPlan:
    """What every layer of one forward shares, computed once per forward (not per layer or per token)."""

    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # bool [B, 1, T, S]; None when every query sees every key slot
    rope: Rotary | None
    cos: torch.Tensor | None = None  # [B, T, 1, rope_dim]
    sin: torch.Tensor | None = None
    native_pos: torch.Tensor | None = None  # set when the native attention runs this step: each row's position
    native_first: torch.Tensor | None = None  # ... and the first key each row sees (a sliding window)


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor  # after the final norm (X-LoRA's classifier input)


#: tokens per chunk of a long cached prefill (see Decoder.forward): exact kernels, and the q8 runtime
PREFILL_CHUNK = 512
NATIVE_PREFILL_CHUNK = 64


class Decoder(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        spec: FamilySpec,
        embed: nn.Module,
        blocks: list[Block],
        final_norm: nn.Module,
        lm_head: nn.Module,
        rope: Rotary | None,
        pos_embed: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.embed, self.pos_embed = embed, pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope = rope
        self.native: Any = None
        #: a cached forward that needs only the last position's logits runs at most this many tokens
        #: (rows x positions) at a time: activation memory is bounded whatever the prompt's length
        self.prefill_chunk = PREFILL_CHUNK

    def use_native_ops(self, lib: Any) -> None:
        """Run one-token decode steps' small ops in ``lib``'s native kernels: norms, rotary + cache write +
        attention, and, over q8 8-row layers, grouped q/k/v and gate/up calls and the whole MLP block (the
        ``kernels="q8"`` runtime: per-op torch dispatch costs more than the work). ``None`` switches back."""
        self.native = lib
        # the q8 kernels' cost per token is flat past a few dozen rows, and these chunks' activations
        # stay small enough for the allocator to reuse them (no growth of the resident set per prompt)
        self.prefill_chunk = PREFILL_CHUNK if lib is None else NATIVE_PREFILL_CHUNK
        for mod in self.modules():
            if isinstance(mod, (RMSNorm, Block)):
                mod.native = lib

    def mask(self, positions: torch.Tensor, n_keys: int | None) -> torch.Tensor | None:
        """Boolean [B, 1, T, S]: key j is visible from a query at position p iff j <= p (and within the window).

        None for a cached decode step whose rows all sit at the last of the ``n_keys`` slots: they see them all
        (unless a sliding window cuts some)."""
        window = self.cfg.sliding_window
        if n_keys is not None and positions.shape[1] == 1 and not (window and n_keys > window):
            if positions.shape[0] == 1 or int(positions.min()) == n_keys - 1:
                return None
        keys = torch.arange(n_keys if n_keys is not None else positions.shape[1])
        q = positions.unsqueeze(-1)
        if n_keys is None:  # no cache: keys are this chunk's own positions
            keys = positions.unsqueeze(1)
        m = keys <= q
        if self.cfg.sliding_window:
            m = m & (keys > q - self.cfg.sliding_window)
        return m.unsqueeze(1)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: Any = None,
        ctx: Any = None,
        last_only: bool = False,
        logits: bool = True,
    ) -> ForwardOutput:
        """ids [B, T]; positions [B, T] (default 0..T-1); writes keys/values into ``cache`` at ``positions``.

        With a cache and ``last_only``, a long input runs in chunks of :attr:`prefill_chunk` tokens, each
        attending to the cache the earlier ones wrote (X-LoRA's per-token scalings run whole)."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T).expand(B, T)
        step = max(1, self.prefill_chunk // B)
        if cache is not None and last_only and T > step and getattr(ctx, "xlora", None) is None:
            top = int(positions.max()) + 1  # the whole prompt's reach: length-dependent rope scalings
            for s in range(0, T - step, step):
                self._forward(ids[:, s:s + step], positions[:, s:s + step], cache, ctx, True, False, top)
            s = (T - 1) // step * step
            return self._forward(ids[:, s:], positions[:, s:], cache, ctx, True, logits, top)
        return self._forward(ids, positions, cache, ctx, last_only, logits)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, ctx: Any, last_only: bool,
                 logits: bool, rope_top: int | None = None) -> ForwardOutput:
        B, T = ids.shape
        x = self.embed(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        n_keys = None if cache is None else cache.prepare(positions)
        step = StepPlan(positions, self.mask(positions, n_keys), self.rope)
        if self.rope is not None:
            step.cos, step.sin = self.rope.tables(positions, rope_top or n_keys)
            if self.native is not None and T == 1 and isinstance(cache, KVCache) \
                    and cache.k[0].dtype == torch.float32 and self.rope.dim % 2 == 0:
                step.native_pos = positions.reshape(B).to(torch.int64).contiguous()
                w = self.cfg.sliding_window
                step.native_first = (step.native_pos - (w - 1)).clamp_(min=0) if w else torch.zeros_like(step.native_pos)
                step.cos, step.sin = step.cos.contiguous(), step.sin.contiguous()
        plans = self._native_step(ctx, B, cache) if step.native_pos is not None else None
        if plans is not None:  # every layer in one native call (the same calls as the loop below)
            cfg = self.cfg
            x = self.native.decode_layers(plans, x.reshape(B, -1).contiguous(), cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.head_dim, step.cos, step.sin,
                                          step.native_pos, step.native_first).view(B, 1, -1)
        else:
            for blk in self.blocks:
                x = blk.forward(x, step, cache, ctx)
        x = self.final_norm.forward(x)
        if last_only:
            x = x[:, -1:]
        out = call_linear(self.lm_head, x, ctx).float() if logits else None
        return ForwardOutput(out, x)

    def _native_step(self, ctx: Any, B: int, cache: KVCache) -> torch.Tensor | None:
        """The plan of :meth:`NativeKernels.decode_layers` for a decode step of ``B`` rows under ``ctx`` on
        ``cache``, or None (X-LoRA, a layer of another shape, no native kernels). Kept on the cache, keyed by
        the adapter set and :func:`adapters_epoch` (a load, an unload, a wrap anywhere)."""
        if getattr(ctx, "xlora", None) is not None or self.pos_embed is not None:
            return None
        key = (ctx.rows if ctx is not None and ctx.rows is not None else (ctx.active if ctx is not None else ()),
               B, adapters_epoch())
        plans = cache.__dict__.setdefault("_native_steps", {})
        if key not in plans:
            if len(plans) > 16:
                plans.clear()
            rows, keep = [], []
            for blk in self.blocks:
                got = blk.native_step_fields(ctx, B, cache)
                if got is None:
                    plans[key] = None
                    return None
                rows.append(got[0])
                keep += got[1]
            plans[key] = (torch.tensor(rows, dtype=torch.int64), keep)
        got = plans[key]
        return None if got is None else got[0]

    # ---- the module tree as the layer map names it
    def linear_slots(self):
        """Yield (role, layer_idx or None, container, key) for every targetable linear."""
        for i, blk in enumerate(self.blocks):
            for role in blk.linears:
                yield role, i, blk.linears, role
        yield "lm_head", None, self, "lm_head"
