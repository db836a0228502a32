"""One decoder for every family: a whole forward pass readable in one screen, in plain torch.

The linears come from the loader as :class:`~qadapt.quant.base.BaseLinear`
(quantized or dense) or adapter wrappers around them, keyed by their role from
the layer map (q, k, v, o, qkv, gate, up, gate_up, down). What differs between
families is the spec (norm, activation, positions) and which roles exist.

This module is the reference. The q8 runtime's fused native decode
(:mod:`qadapt.models.native`) is applied to a built decoder as a transform: it
overrides the four steps a block is made of (:meth:`Block.project`,
:meth:`Block.attend`, :meth:`Block.mlp`) and the layer loop
(:meth:`Decoder.layers`), and nothing here knows of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .family import FamilySpec
from .rope import RopeSpec, inv_freq


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        if cos.device != positions.device:  # built on the CPU, kept on the device the model runs on
            cos, sin = self._tables[key] = (cos.to(positions.device), sin.to(positions.device))
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


def _capped_attention(q, k, v, mask, scale: float | None, cap: float) -> torch.Tensor:
    """Attention with tanh soft-capped scores (Gemma 2: ``cap * tanh(s / cap)`` before the mask), which
    scaled_dot_product_attention has no form for: q [B, T, H, D], k/v [B, Hkv, S, D] -> [B, T, H*D]."""
    B, T, H, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.matmul(q.transpose(1, 2), k.transpose(2, 3)) * (scale if scale is not None else D ** -0.5)
    s = torch.tanh(s / cap) * cap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    a = torch.matmul(torch.softmax(s.float(), -1).to(q.dtype), v)
    return a.transpose(1, 2).reshape(B, T, H * D)


def call_linear(m: nn.Module, x: torch.Tensor, ctx: Any) -> torch.Tensor:
    """Adapter wrappers take the per-forward context (active adapters, X-LoRA scalings); base layers don't.

    Layers inside the decoder are called through ``forward`` (here and in the blocks): ``Module.__call__``'s
    hook machinery costs a few microseconds a call, ~10 calls per block and token, and no hooks are used."""
    return m.forward(x, ctx) if getattr(m, "takes_context", False) else m.forward(x)


@dataclass
class StepPlan:
    """What every layer of one forward shares, computed once per forward (not per layer or per token)."""

    positions: torch.Tensor  # [B, T]
    mask: torch.Tensor | None  # bool [B, 1, T, S]; None when every query sees every key slot
    rope: Rotary | None
    cos: torch.Tensor | None = None  # [B, T, 1, rope_dim]
    sin: torch.Tensor | None = None
    #: the sliding layers' own (mask, cos, sin) where layers differ (Gemma: windowed local layers, their rotary)
    local: tuple | None = None


@dataclass
class ForwardOutput:
    logits: torch.Tensor | None
    hidden: torch.Tensor  # after the final norm (X-LoRA's classifier input)
    scores: tuple[torch.Tensor, ...] | None = None  # (logprob [B, T-1], top logprobs, top ids [B, T-1, k])


class Block(nn.Module):
    """Pre-norm attention and MLP, each with its residual: ``x + o(attend(qkv(norm(x))))``, then
    ``x + down(act(gate) * up)`` (or ``down(act(up))``) of the second norm."""

    def __init__(self, cfg: ModelConfig, spec: FamilySpec, linears: dict[str, nn.Module], attn_norm: nn.Module,
                 mlp_norm: nn.Module, qkv_split: tuple[int, int, int] | None, layer_idx: int,
                 qk_norms: tuple[nn.Module, nn.Module] | None = None,
                 post_norms: tuple[nn.Module, nn.Module] | None = None,
                 experts: list[dict[str, nn.Module]] | None = None):
        super().__init__()
        self.cfg, self.spec, self.layer_idx = cfg, spec, layer_idx
        self.linears = nn.ModuleDict(linears)
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.qkv_split = qkv_split
        self.q_norm, self.k_norm = qk_norms or (None, None)  # per head, before rotary (Qwen3, Gemma 3)
        self.post_attn_norm, self.post_mlp_norm = post_norms or (None, None)  # Gemma's sandwich norms
        self.kind = cfg.layer_kinds[layer_idx] if cfg.layer_kinds else "full"
        #: a mixture-of-experts MLP: per expert its expert_gate / expert_up / expert_down, routed by "router"
        self.experts = nn.ModuleList(nn.ModuleDict(e) for e in experts) if experts else None

    @property
    def standard(self) -> bool:
        """A Llama-shaped block (what the fused native decode step runs), Qwen3's per-head q/k RMS norms included."""
        c = self.cfg
        qk = self.q_norm is None or all(isinstance(n, RMSNorm) and n.weight.numel() == c.head_dim
                                        for n in (self.q_norm, self.k_norm))
        return qk and self.post_attn_norm is None and c.layer_kinds is None and \
            c.attn_softcap is None and c.attn_scale is None and self.experts is None

    def forward(self, x: torch.Tensor, step: StepPlan, cache: Any, ctx: Any) -> torch.Tensor:
        h = self.attn_norm.forward(x)
        if "qkv" in self.linears:
            q, k, v = call_linear(self.linears["qkv"], h, ctx).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.project(("q", "k", "v"), h, ctx)
        a = self.project(("o",), self.attend(q, k, v, step, cache), ctx)[0]
        if self.post_attn_norm is not None:
            a = self.post_attn_norm.forward(a)
        return self.mlp(x + a, ctx)

    def project(self, roles: tuple[str, ...], h: torch.Tensor, ctx: Any) -> list[torch.Tensor]:
        """The linears ``roles`` on the same input ``h``."""
        return [call_linear(self.linears[r], h, ctx) for r in roles]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepPlan, cache: Any) -> torch.Tensor:
        """Rotary, the cache write and scaled-dot-product attention: q [B, T, H*D], k/v [B, T, Hkv*D] -> [B, T, H*D]."""
        cfg = self.cfg
        B, T = q.shape[:2]
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        mask, cos, sin = step.local if self.kind == "sliding" and step.local else (step.mask, step.cos, step.sin)
        if step.rope is not None:
            q, k = step.rope.apply(q, cos, sin), step.rope.apply(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, step.positions, k, v)  # [B, Hkv, S, D]
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        k, v = k.to(q.dtype), v.to(q.dtype)
        scale = cfg.attn_scale
        if cfg.attn_softcap is not None:
            return _capped_attention(q, k, v, mask, scale, cfg.attn_softcap)
        if T == 1:
            # one query per row: a KV head's H/Hkv query heads are the rows of one [rep, D] query
            # (no copies of the keys per query head); the mask [B, 1, 1, S] broadcasts over them
            a = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k, v, attn_mask=mask, scale=scale)
            return a.reshape(B, 1, H * D)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=H != Hkv, scale=scale)
        return a.transpose(1, 2).reshape(B, T, H * D)

    def mlp(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        h = self.mlp_norm.forward(x)
        if self.experts is not None:
            return x + self.moe(h, ctx)
        if "gate_up" in self.linears:
            gate, up = call_linear(self.linears["gate_up"], h, ctx).chunk(2, dim=-1)
            h = _act(self.spec.act, gate) * up
        elif "gate" in self.linears:
            gate, up = self.project(("gate", "up"), h, ctx)
            h = _act(self.spec.act, gate) * up
        else:
            h = _act(self.spec.act, call_linear(self.linears["up"], h, ctx))
        h = call_linear(self.linears["down"], h, ctx)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm.forward(h)
        return x + h


    def moe(self, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """A sparse mixture of experts (Mixtral, Qwen3-MoE): each token's router softmax (float32), its top k
        experts (weights renormalised to sum to 1 where the config says so), each expert's gated MLP on the
        tokens routed to it, summed with those weights. Each expert runs once per forward on its tokens; an
        adapter context with per-row adapters or aLoRA starts is narrowed to those tokens."""
        cfg = self.cfg
        B, T, D = h.shape
        logits = call_linear(self.linears["router"], h, ctx).reshape(B * T, -1)
        weights, chosen = torch.topk(torch.softmax(logits.float(), -1), cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = h.reshape(B * T, D)
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():
            tok, slot = torch.where(chosen == e)
            sub = ctx.narrow(tok // T, tok % T) if ctx is not None and (ctx.rows or ctx.alora) else ctx
            ex = self.experts[e]
            xe = flat.index_select(0, tok).unsqueeze(0 if sub is ctx else 1)  # [1, n, D], or a row per token
            ye = _act(self.spec.act, call_linear(ex["expert_gate"], xe, sub)) * call_linear(ex["expert_up"], xe, sub)
            ye = call_linear(ex["expert_down"], ye, sub).reshape(-1, D)
            out.index_add_(0, tok, ye * weights[tok, slot].unsqueeze(1).to(ye.dtype))
        return out.reshape(B, T, D)


#: tokens per chunk of a long cached prefill (see Decoder.forward): exact kernels, and the q8 runtime
PREFILL_CHUNK = 512
SCORE_CHUNK = 128  # tokens per forward when a prompt is scored (their logits [T, V] are held)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: FamilySpec, embed: nn.Module, blocks: list[Block], final_norm: nn.Module,
                 lm_head: nn.Module, rope: Rotary | None, pos_embed: nn.Module | None = None):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        self.embed, self.pos_embed = embed, pos_embed
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope = rope
        #: the sliding layers' rotary where it differs from the others' (Gemma 3's local base)
        self.rope_local = Rotary(cfg.local_rope, rope.max_pos) if rope is not None and cfg.local_rope else None
        #: a cached forward that needs only the last position's logits runs at most this many tokens
        #: (rows x positions) at a time: activation memory is bounded whatever the prompt's length
        self.prefill_chunk = PREFILL_CHUNK

    def mask(self, positions: torch.Tensor, n_keys: int | None, window: int | None = -1) -> torch.Tensor | None:
        """Boolean [B, 1, T, S]: key j is visible from a query at position p iff j <= p (and within the window:
        the config's, unless ``window`` is given; None: no window).

        None for a cached decode step whose rows all sit at the last of the ``n_keys`` slots: they see them all
        (unless a sliding window cuts some)."""
        if window == -1:
            window = None if self.cfg.layer_kinds else self.cfg.sliding_window
        if n_keys is not None and positions.shape[1] == 1 and not (window and n_keys > window):
            if positions.shape[0] == 1 or int(positions.min()) == n_keys - 1:
                return None
        keys = torch.arange(n_keys if n_keys is not None else positions.shape[1], device=positions.device)
        q = positions.unsqueeze(-1)
        if n_keys is None:  # no cache: keys are this chunk's own positions
            keys = positions.unsqueeze(1)
        m = keys <= q
        if window:
            m = m & (keys > q - window)
        return m.unsqueeze(1)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, cache: Any = None, ctx: Any = None,
                last_only: bool = False, logits: bool = True, score: int | None = None) -> ForwardOutput:
        """ids [B, T]; positions [B, T] (default 0..T-1); writes keys/values into ``cache`` at ``positions``.

        With a cache and ``last_only``, a long input runs in chunks of :attr:`prefill_chunk` tokens, each
        attending to the cache the earlier ones wrote (X-LoRA's per-token scalings run whole). ``score=k``
        (with a cache) also scores the input: :attr:`ForwardOutput.scores` holds each next input token's
        log-probability [B, T-1] and the ``k`` most likely tokens at each position (a prompt's logprobs)."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        step = max(1, self.prefill_chunk // B)
        if score is not None:
            step = min(step, SCORE_CHUNK)  # a chunk's full logits [B, step, V] are held at once
        chunked = cache is not None and (score is not None or (last_only and T > step))
        if not chunked or getattr(ctx, "xlora", None) is not None:
            return self._forward(ids, positions, cache, ctx, last_only, logits)
        top = int(positions.max()) + 1  # the whole prompt's reach: length-dependent rope scalings
        parts: list[tuple[torch.Tensor, ...]] = []
        for s in range(0, T, step):
            e, last = min(T, s + step), s + step >= T
            if score is None:
                out = self._forward(ids[:, s:e], positions[:, s:e], cache, ctx, True, logits and last, top)
                continue
            out = self._forward(ids[:, s:e], positions[:, s:e], cache, ctx, False, True, top)
            logp = torch.log_softmax(out.logits, -1)
            nxt = ids[:, s + 1:e + 1]
            lp = logp[:, :nxt.shape[1]].gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            tv, ti = torch.topk(logp[:, :nxt.shape[1]], min(score, logp.shape[-1])) if score else (
                logp.new_empty(B, nxt.shape[1], 0), nxt.new_empty(B, nxt.shape[1], 0))
            parts.append((lp, tv, ti))
            out = ForwardOutput(out.logits[:, -1:] if last_only else out.logits, out.hidden[:, -1:])
        if parts:
            out.scores = tuple(torch.cat(p, 1) for p in zip(*parts))
        return out

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, ctx: Any, last_only: bool,
                 logits: bool, rope_top: int | None = None, plan: StepPlan | None = None) -> ForwardOutput:
        """One forward; ``plan``: the layers' shared step, given (a captured decode step's, built from device
        tensors only: :mod:`qadapt.runtime.graphs`) instead of planned here from ``positions`` and ``cache``."""
        if ctx is not None and getattr(ctx, "alora", None):
            ctx.extra["positions"] = positions  # this chunk's: where aLoRA deltas apply
        x = self.embed(ids, ctx) if getattr(self.embed, "takes_context", False) else self.embed(ids)
        if self.cfg.embed_scale is not None:  # Gemma: sqrt(hidden), in the weights' dtype as transformers does
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if plan is None:
            n_keys = None if cache is None else cache.prepare(positions)
            plan = self.step_plan(positions, n_keys, rope_top, cache)
        x = self.layers(x, plan, cache, ctx)
        x = self.final_norm.forward(x)
        if last_only:
            x = x[:, -1:]
        out = call_linear(self.lm_head, x, ctx).float() if logits else None
        if out is not None and self.cfg.final_softcap is not None:
            cap = self.cfg.final_softcap
            out = torch.tanh(out / cap) * cap
        return ForwardOutput(out, x)

    def step_plan(self, positions: torch.Tensor, n_keys: int | None, rope_top: int | None, cache: Any) -> StepPlan:
        """What every layer of the forward shares (``cache``: for a transform that decides by it)."""
        step = StepPlan(positions, self.mask(positions, n_keys), self.rope)
        if self.rope is not None:
            step.cos, step.sin = self.rope.tables(positions, rope_top or n_keys)
        if self.cfg.layer_kinds and "sliding" in self.cfg.layer_kinds:
            rope = self.rope_local or self.rope
            cos, sin = rope.tables(positions, rope_top or n_keys) if rope is not None else (None, None)
            step.local = (self.mask(positions, n_keys, self.cfg.sliding_window), cos, sin)
        return step

    def layers(self, x: torch.Tensor, step: StepPlan, cache: Any, ctx: Any) -> torch.Tensor:
        for blk in self.blocks:
            x = blk.forward(x, step, cache, ctx)
        return x

    # ---- the module tree as the layer map names it
    def linear_slots(self):
        """Yield (role, layer_idx or None, container, key) for every targetable linear."""
        for i, blk in enumerate(self.blocks):
            for role in blk.linears:
                yield role, i, blk.linears, role
        yield "lm_head", None, self, "lm_head"
