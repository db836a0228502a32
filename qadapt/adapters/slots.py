"""Adapter slots on the compute device: the active set's LoRA factors stacked per layer, each row an index.

vLLM's and LoRAX's layout: ``slots`` adapters live on the device at once; per LoRA layer, ``A [S, R, in]``
and ``Bt [S, R, out]`` (ranks padded with zeros to ``R``; a slot whose adapter does not touch the layer
is zero there) and ``scale [S]``. A batch's rows name adapters; :meth:`SlotBank.prepare` gives each a slot
(least recently used slots not in the batch are reused; the others' factors stay in host memory, where
the adapters were loaded) and copies what changed, on a side stream on CUDA so the copy overlaps the
step before it; each layer then adds every row's delta with one gathered kernel pair
(:func:`qadapt.quant.triton.bgmv.bgmv`, or :func:`bgmv_reference` in torch where Triton does not run),
not a loop over adapters.

Plain LoRA only (``scale * B A x``); rows whose adapters carry more (DoRA, saved modules, biases, aLoRA)
take the per-adapter path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ..errors import UnsupportedError


def check_bgmv(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor,
               idx: torch.Tensor, ranged: bool = True) -> None:
    """Shapes, dtypes and devices; with ``ranged`` also every slot index (a read of ``idx`` back to the host:
    :class:`SlotBank`, whose indices are in range by construction, skips it so a CUDA graph can capture it)."""
    S, R, K = a.shape
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [M, {K}], got {list(x.shape)}")
    if bt.dim() != 3 or bt.shape[:2] != (S, R):
        raise ValueError(f"Bt must be [{S}, {R}, out], got {list(bt.shape)}")
    if y.shape != (x.shape[0], bt.shape[2]) or y.stride(1) != 1:
        raise ValueError(f"y must be a row-major [{x.shape[0]}, {bt.shape[2]}], got {list(y.shape)}")
    if scale.shape != (S,) or idx.shape != (x.shape[0],) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"scale must be [{S}] and idx int [{x.shape[0]}]")
    if len({t.device for t in (x, y, a, bt, scale, idx)}) != 1:
        raise ValueError("x, y, the stacks and idx must be on one device")
    if ranged and idx.numel() and (int(idx.max()) >= S or int(idx.min()) < -1):
        raise ValueError(f"slot indices must be in [-1, {S})")


def bgmv_reference(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor,
                   idx: torch.Tensor) -> torch.Tensor:
    """``y[m] += scale[s] * Bt[s].T @ (A[s] @ x[m])``, ``s = idx[m]`` (-1: none), in torch: gather each row's
    factors, two batched matmuls; in place."""
    check_bgmv(x, y, a, bt, scale, idx)
    rows = (idx >= 0).nonzero().flatten()
    if not rows.numel():
        return y
    s = idx[rows].long()
    t = torch.bmm(a[s].float(), x[rows].float().unsqueeze(2))  # [m, R, 1]
    d = torch.bmm(bt[s].float().transpose(1, 2), t).squeeze(2) * scale[s].float().unsqueeze(1)
    y[rows] += d.to(y.dtype)
    return y


def bgmv(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor,
         idx: torch.Tensor, ranged: bool = True) -> torch.Tensor:
    """The Triton kernels where they run on x's device, else :func:`bgmv_reference`."""
    from ..quant import triton as qt

    if qt.available(x.device):
        from ..quant.triton.bgmv import bgmv as kernel

        return kernel(x, y, a, bt, scale, idx, ranged)
    return bgmv_reference(x, y, a, bt, scale, idx)


class _Stack:
    """One layer's slots."""

    def __init__(self, slots: int, rank: int, in_features: int, out_features: int, device, dtype):
        self.a = torch.zeros(slots, rank, in_features, dtype=dtype, device=device)
        self.bt = torch.zeros(slots, rank, out_features, dtype=dtype, device=device)
        self.scale = torch.zeros(slots, dtype=torch.float32, device=device)
        self.filled: list[tuple[str, int] | None] = [None] * slots  # (name, epoch) each slot holds here


class SlotBank:
    """``slots`` device slots of rank up to ``rank`` for the adapters of the running batch."""

    def __init__(self, slots: int = 16, rank: int = 64, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if slots < 1 or rank < 1:
            raise ValueError("slots and rank must be positive")
        self.slots, self.rank, self.device, self.dtype = slots, rank, torch.device(device), dtype
        self._owner: list[tuple[str, int] | None] = [None] * slots
        self._lru: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recent first
        self._stacks: dict[int, _Stack] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and torch.cuda.is_available() \
            else None
        self._ready: Any = None  # the copy stream's event the next forward waits for
        self.swaps = 0

    def prepare(self, rows: tuple[tuple[str, ...], ...], layers: list[Any], epoch: int) -> list[torch.Tensor]:
        """Slots for ``rows``' adapters (loaded where missing, into every one of ``layers``); per adapter
        position j of a row, the slot index of each row's j-th adapter (-1: none)."""
        names = list(dict.fromkeys(n for r in rows for n in r))
        if len(names) > self.slots:
            raise UnsupportedError(f"{len(names)} distinct adapters in one batch, more than the {self.slots} device "
                                   "slots (max_slots); run fewer at once or give more slots")
        want = set(names)
        changed = len(layers) != len(self._stacks)
        for n in names:
            if n in self._lru and self._owner[self._lru[n]] == (n, epoch):
                self._lru.move_to_end(n)
                continue
            for layer in layers:  # checked once, when the adapter takes a slot
                f = layer.adapters.get(n)
                if f is not None and f.A.shape[0] > self.rank:
                    raise UnsupportedError(f"adapter `{n}` has rank {f.A.shape[0]} at {layer.path}, above the device "
                                           f"slots' rank {self.rank} (max_slot_rank)")
            changed = True
            self._lru.pop(n, None)
            free = [s for s in range(self.slots) if self._owner[s] is None or self._owner[s][1] != epoch]
            if free:
                slot = free[0]
                if self._owner[slot] is not None:
                    self._lru.pop(self._owner[slot][0], None)
            else:
                victim = next(v for v in self._lru if v not in want)
                slot = self._lru.pop(victim)
            self._owner[slot] = (n, epoch)
            self._lru[n] = slot
            self.swaps += 1
        if changed:  # a swap, or a layer without its stack yet: bring the stacks in line
            self._copy(layers)
        depth = max((len(r) for r in rows), default=0)
        return [torch.tensor([self._lru[r[j]] if j < len(r) else -1 for r in rows], dtype=torch.int32,
                             device=self.device) for j in range(depth)]

    def _copy(self, layers: list[Any]) -> None:
        """Bring every layer's slots in line with their owners (on the side stream on CUDA)."""
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else _nullcontext()
        with ctx, torch.no_grad():
            for layer in layers:
                st = self._stacks.get(id(layer))
                if st is None:
                    st = self._stacks[id(layer)] = _Stack(self.slots, self.rank, layer.in_features,
                                                          layer.out_features, self.device, self.dtype)
                for s, owner in enumerate(self._owner):
                    if owner is None or st.filled[s] == owner:
                        continue
                    f = layer.adapters.get(owner[0])
                    st.a[s].zero_()
                    st.bt[s].zero_()
                    st.scale[s] = 0.0
                    if f is not None and f.plain:
                        r = f.A.shape[0]
                        st.a[s, :r].copy_(f.A, non_blocking=True)
                        st.bt[s, :r].copy_(layer._bt[owner[0]], non_blocking=True)
                        st.scale[s] = f.scale
                    st.filled[s] = owner
            if self._stream is not None:
                self._ready = torch.cuda.Event()
                self._ready.record(self._stream)

    def sync(self) -> None:
        """Make the running stream wait for the slot copies :meth:`prepare` queued (once)."""
        if self._ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            self._ready = None

    def apply(self, layer: Any, x2d: torch.Tensor, y2d: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
        """``y2d`` plus each row's deltas at ``layer`` (in place)."""
        self.sync()
        st = self._stacks[id(layer)]
        for idx in indices:
            bgmv(x2d.to(st.a.dtype), y2d, st.a, st.bt, st.scale, idx, ranged=False)
        return y2d


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
