"""Many adapters in one batch: each row's LoRA delta from stacked factors, one gathered kernel pair per layer.

Punica's BGMV (as vLLM and LoRAX run it): the factors of the adapters in device slots are stacked,
``A [S, R, in]`` and ``Bt [S, R, out]`` (rank padded with zeros to ``R``) with ``scale [S]``; ``idx [M]``
names each row's slot (-1: none). ``shrink`` computes ``t[m] = A[idx[m]] @ x[m]`` for every row at once,
``expand`` adds ``scale[idx[m]] * Bt[idx[m]].T @ t[m]`` to ``y[m]``: two launches whatever the number of
distinct adapters. :func:`qadapt.adapters.slots.bgmv_reference` is the same in torch (gather + batched
matmul), what runs where Triton does not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...adapters.slots import check_bgmv


@triton.jit
def _shrink(x, a, idx, t, K, R, sxm, sas, sar, stm, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    s = tl.load(idx + m)
    r = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD,), dtype=tl.float32)
    if s >= 0:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x + m.to(tl.int64) * sxm + k, mask=k < K, other=0.0).to(tl.float32)
            at = tl.load(a + s.to(tl.int64) * sas + r[:, None] * sar + k[None, :],
                         mask=(r[:, None] < R) & (k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(at * xv[None, :], axis=1)
    tl.store(t + m.to(tl.int64) * stm + r, acc, mask=r < R)


@triton.jit
def _expand(t, bt, scale, idx, y, N, R, stm, sbs, sbr, sym, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    pn = tl.program_id(1)
    s = tl.load(idx + m)
    if s >= 0:
        r = tl.arange(0, R_PAD)
        n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        tv = tl.load(t + m.to(tl.int64) * stm + r, mask=r < R, other=0.0)
        b = tl.load(bt + s.to(tl.int64) * sbs + r[:, None] * sbr + n[None, :],
                    mask=(r[:, None] < R) & (n[None, :] < N), other=0.0).to(tl.float32)
        d = tl.sum(b * tv[:, None], axis=0) * tl.load(scale + s)
        yp = y + m.to(tl.int64) * sym + n
        old = tl.load(yp, mask=n < N, other=0.0)
        tl.store(yp, (old.to(tl.float32) + d).to(old.dtype), mask=n < N)


def bgmv(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor,
         idx: torch.Tensor, ranged: bool = True) -> torch.Tensor:
    """``y[m] += scale[s] * Bt[s].T @ (A[s] @ x[m])`` with ``s = idx[m]`` (rows with -1 untouched); in place.
    ``ranged=False``: the caller vouches for the indices (:class:`~qadapt.adapters.slots.SlotBank`'s)."""
    check_bgmv(x, y, a, bt, scale, idx, ranged)
    M, (_, R, K), N = x.shape[0], a.shape, bt.shape[2]
    if M == 0:
        return y
    x = x.contiguous()
    a, bt = a.contiguous(), bt.contiguous()
    t = torch.empty(M, R, dtype=torch.float32, device=x.device)
    rp = max(16, triton.next_power_of_2(R))
    _shrink[(M,)](x, a, idx, t, K, R, x.stride(0), a.stride(0), a.stride(1), t.stride(0), R_PAD=rp, BLOCK_K=64)
    bn = 64
    _expand[(M, triton.cdiv(N, bn))](t, bt, scale.float().contiguous(), idx, y, N, R, t.stride(0), bt.stride(0),
                                     bt.stride(1), y.stride(0), R_PAD=rp, BLOCK_N=bn)
    return y
