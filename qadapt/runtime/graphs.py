"""Decode steps captured in CUDA graphs: one replay per token instead of hundreds of kernel launches.

At batch-1 decode on a GPU the step is launch-bound: a few hundred small kernels (GEMVs, norms, rotary, the
slots' BGMV pairs), each costing microseconds of host time. Once a step's shapes are fixed (batch rows,
adapters per row, the cache) its kernels can be recorded once and replayed: :class:`DecodeGraphs` does that
for :meth:`qadapt.api.Model.step` on a one-token step.

What a replay cannot do is ask the host anything, so a captured step is built from device tensors only
(:func:`static_plan`): it attends over every slot of the cache with a mask computed from the positions on the
device (keys past a row's position are masked, so the extra slots change nothing: their softmax weight is
exactly 0), writes keys and values by (row, position) index, and takes rotary tables gathered at the
positions. Its inputs (token ids, positions, each row's slot indices) live in static buffers, copied in
before each replay; the slots' factors are already on the device, copied by
:meth:`~qadapt.adapters.slots.SlotBank.prepare` before the step as always. Every LoRA layer adds its slots'
deltas whatever the capture-time rows were (a slot is zero where its adapter has no factors), so one graph
serves any plain-LoRA rows of that shape.

Captured per (cache, batch rows, adapter slots per row, adapter set epoch), at most :data:`MAX_GRAPHS`
kept (the least recently used dropped, and those whose cache was dropped: a graph holds its cache weakly). Steps a graph cannot express run eagerly, as before: prompts
(more than one token), X-LoRA, aLoRA, rows with DoRA / saved modules / embedding parts, mixture-of-experts
blocks, rotary scalings that change with the length. The first replay of every graph is checked against
the eager step it was captured from (the same kernels on the same inputs: equal but for attention over the
masked slots); a mismatch turns graphs off for the model, with a warning, and the eager result is used.

On CPU there is no graph: ``DecodeGraphs(model, capture=False)`` runs the same static step eagerly from the
same buffers, which is how CI checks everything here but the capture itself (tests/test_graphs.py).
``QADAPT_CUDA_GRAPHS=0`` turns graphs off.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.decoder import StepPlan
from .kv_cache import KVCache

log = logging.getLogger(__name__)

#: graphs kept per model (each holds its own static buffers and a reference to its cache)
MAX_GRAPHS = 8


def enabled() -> bool:
    return os.environ.get("QADAPT_CUDA_GRAPHS", "1") not in ("0", "", "false", "no")


class StaticCache:
    """A :class:`KVCache` as a captured step sees it: every slot attended (the plan's mask hides the ones past
    each row's position), this step's keys written by (row, position) index: no host reads."""

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.k, self.v, self.rows = cache.k, cache.v, rows  # its tensors, not the cache (held weakly); rows: [B, 1]

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        kc, vc = self.k[layer], self.v[layer]
        kc[self.rows, :, positions] = k.to(kc.dtype)
        vc[self.rows, :, positions] = v.to(vc.dtype)
        return kc, vc


def static_plan(dec: Any, positions: torch.Tensor, keys: torch.Tensor, tables: dict) -> StepPlan:
    """The layers' shared step from device tensors only: masks over all ``keys`` (arange of the cache's
    slots) and rotary rows gathered at ``positions`` from the full tables (``tables``: rope -> (cos, sin))."""
    q = positions.unsqueeze(-1)  # [B, 1, 1]
    seen = keys <= q

    def rotary(rope):
        if rope is None:
            return None, None
        cos, sin = tables[id(rope)]
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    window = None if dec.cfg.layer_kinds else dec.cfg.sliding_window
    mask = seen & (keys > q - window) if window else seen
    plan = StepPlan(positions, mask.unsqueeze(1), dec.rope)
    plan.cos, plan.sin = rotary(dec.rope)
    if dec.cfg.layer_kinds and "sliding" in dec.cfg.layer_kinds:
        local = seen & (keys > q - dec.cfg.sliding_window)
        plan.local = (local.unsqueeze(1), *rotary(dec.rope_local or dec.rope))
    return plan


@dataclass
class _Graph:
    cache: Any  # weakref.ref to the KVCache it writes into: a dropped cache frees its memory and its graph
    ids: torch.Tensor
    positions: torch.Tensor
    indices: list[torch.Tensor]
    run: Any  # () -> logits [B, V] (a replay, or the static step itself without capture)
    out: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class DecodeGraphs:
    """A model's captured one-token steps (see the module's notes)."""

    def __init__(self, model: Any, capture: bool = True):
        self.model, self.capture = model, capture
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.off: str | None = None  # why graphs were turned off
        self.replays = 0
        self._pool: Any = None

    # ------------------------------------------------------------------ when
    def usable(self, ids: torch.Tensor, cache: Any, ctx: Any) -> bool:
        """Whether this step can run from a graph (else the caller runs it eagerly)."""
        if self.off is not None or ids.shape[1] != 1 or type(cache) is not KVCache or ids.shape[0] != cache.batch:
            return False
        dec = self.model.decoder
        if any(getattr(b, "experts", None) is not None for b in dec.blocks):
            return False
        for rope in (dec.rope, dec.rope_local):  # frequencies that change with the length: eager
            if rope is not None and rope._variant(1) != rope._variant(cache.max_len):
                return False
        if ctx is None:
            return True
        if ctx.xlora is not None or ctx.alora or "general_rows" in ctx.extra or ctx.rows is None:
            return False
        parts = getattr(dec.embed, "parts", {})
        return not any(n in parts for r in ctx.rows for n in r)

    # ------------------------------------------------------------------ run
    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, ctx: Any) -> torch.Tensor:
        """The logits [B, V] of a one-token step, on the device (the caller checked :meth:`usable`)."""
        from ..adapters.lora import adapters_epoch

        bank, indices = ctx.extra["slots"] if ctx is not None else (None, [])
        key = (id(cache), ids.shape[0], len(indices), adapters_epoch() if ctx is not None else None)
        g = self.graphs.get(key)
        if g is not None and g.cache() is not cache:  # a new cache where a dropped one was: capture again
            g = None
        if bank is not None:
            bank.sync()  # the slot copies prepare() queued, before the step reads them
        if g is None:
            return self._capture(key, ids, positions, cache, ctx, bank, indices)
        self.graphs.move_to_end(key)
        g.ids.copy_(ids)
        g.positions.copy_(positions)
        for buf, ix in zip(g.indices, indices):
            buf.copy_(ix)
        self.replays += 1
        return g.run()

    def _capture(self, key: tuple, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, ctx: Any,
                 bank: Any, indices: list[torch.Tensor]) -> torch.Tensor:
        from ..adapters.context import AdapterContext

        dec = self.model.decoder
        dev = ids.device
        sids, spos = ids.clone(), positions.clone()
        sidx = [ix.clone() for ix in indices]
        sctx = None
        if ctx is not None:
            sctx = AdapterContext(rows=ctx.rows)
            sctx.extra.update(slots=(bank, sidx), device=dev, graph=True)
            sctx.row_groups()  # built now: a capture may not copy from the host
        tables = {}
        for rope in (dec.rope, dec.rope_local):
            if rope is not None:
                cos, sin = rope._table(rope._variant(cache.max_len), cache.max_len, cache.max_len)
                tables[id(rope)] = (cos.to(dev), sin.to(dev))
        keys = torch.arange(cache.max_len, device=dev)
        scache = StaticCache(cache, torch.arange(ids.shape[0], device=dev).unsqueeze(1))

        def static_step() -> torch.Tensor:
            plan = static_plan(dec, spos, keys, tables)
            return dec._forward(sids, spos, scache, sctx, True, True, plan=plan).logits[:, -1]

        g = _Graph(weakref.ref(cache), sids, spos, sidx, static_step)
        if self.capture:
            want = self._record(g, static_step, dev)
            if want is None:
                return static_step()
            got = g.run()
            tol = 1e-3 * float(want.abs().max()) + 1e-5
            if not torch.allclose(got, want, rtol=0, atol=tol):
                self.off = f"a replay differed from its eager step by {float((got - want).abs().max()):.3g}"
                log.warning("CUDA graphs turned off for this model: %s", self.off)
                self.graphs.clear()
                return want
            out = got
        else:
            out = static_step()
        for k in [k for k, old in self.graphs.items() if old.cache() is None]:
            del self.graphs[k]  # their caches are gone
        self.graphs[key] = g
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return out

    def _record(self, g: _Graph, fn: Any, dev: torch.device) -> torch.Tensor | None:
        """Capture ``fn`` into a CUDA graph (``g.run`` then replays it); the eager result of the warm-up, or None
        (and graphs off, with a warning) where capture fails."""
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (cuBLAS workspaces, Triton's first launches) before capture
                    want = fn()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                g.out = fn()
            self._pool = graph.pool()
        except Exception as e:  # an op that reads back to the host, or one CUDA cannot capture
            self.off = f"capture failed ({type(e).__name__}: {e})"
            log.warning("CUDA graphs turned off for this model: %s; decoding eagerly", self.off)
            try:
                torch.cuda.synchronize(dev)
            except Exception:  # noqa: BLE001 - the failed capture's own error was reported above
                pass
            return None
        g.extra["graph"] = graph

        def replay() -> torch.Tensor:
            graph.replay()
            return g.out

        g.run = replay
        return want
