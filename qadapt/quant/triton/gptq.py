"""``x @ W.T`` with ``W`` a GPTQ layer's packed codes, dequantized tile by tile in the kernel.

The layer's own tensors, as :class:`~qadapt.quant.gptq.GPTQLinear` holds them: ``qweight`` int32
[in * bits / 32, out] (the codes of 32 / bits input rows per word, little-endian bit fields), ``zeros``
[groups, out] (unpacked, the v1 ``+ 1`` applied), ``scales`` fp16 [groups, out] and ``g_idx`` int32 [in]
(act-order included: each input row's group is gathered, so no column permutation is needed). Each
program takes BLOCK_M input rows and BLOCK_N outputs and walks the input BLOCK_K rows at a time:
``w = scales[g] * (q - zeros[g])`` for that [BLOCK_K, BLOCK_N] slice, then one tile product. Bit widths
whose fields stay inside one word: 2, 4, 8 (3-bit fields straddle words: refused by name).

Precision as :mod:`.ggml`: ``exact=True`` multiplies float32 tiles in IEEE float32; otherwise tiles are
rounded to float16 on tensor cores with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import DECODE_MAX_ROWS, Tiled, configs, mma, start, store, x_tile

#: bit widths the kernel takes (fields never straddle a 32-bit word)
BITS = (2, 4, 8)


@triton.jit
def _matmul(x, qw, zeros, scales, g_idx, y, M, N, K, sxm, sym, BITS: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nn = tl.where(n < N, n, 0).to(tl.int64)[None, :]
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kin = k < K
        kk = tl.where(kin, k, 0)
        word = tl.load(qw + (kk // PER).to(tl.int64)[:, None] * N + nn)  # [BK, BN] int32
        q = (word >> ((kk % PER) * BITS)[:, None]) & MASK
        g = tl.load(g_idx + kk).to(tl.int64)[:, None]
        z = tl.load(zeros + g * N + nn).to(tl.int32)
        s = tl.load(scales + g * N + nn).to(tl.float32)
        w = tl.where(kin[:, None], (q - z).to(tl.float32) * s, 0.0)  # [BK, BN]
        acc = mma(acc, x_tile(x, m, kk, kin, M, sxm), w, EXACT, BLOCK_M)
    store(y, acc, m, n, M, N, sym)


def matmul(x2d: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
           g_idx: torch.Tensor, bits: int, exact: bool = False) -> torch.Tensor:
    """``x2d [M, in] @ W.T`` -> float32 [M, out] for the GPTQ tensors (all on x's device)."""
    if bits not in BITS:
        raise ValueError(f"the Triton GPTQ kernel takes {BITS}-bit codes, not {bits}-bit (its fields straddle "
                         "32-bit words): load with mode='dequantize'")
    K, N = g_idx.numel(), qweight.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] * (32 // bits) < K:
        raise ValueError(f"qweight must be int32 [{-(-K * bits // 32)}, {N}], got {qweight.dtype} "
                         f"{list(qweight.shape)}")
    if tuple(zeros.shape) != tuple(scales.shape) or zeros.shape[1] != N:
        raise ValueError(f"zeros {list(zeros.shape)} and scales {list(scales.shape)} must both be [groups, {N}]")
    x2d, y = start(x2d, K, N, "GPTQ", qweight, zeros, scales, g_idx)
    M = x2d.shape[0]
    if M == 0:
        return y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    (_DECODE if M <= DECODE_MAX_ROWS else _PREFILL).launch(
        grid, x2d, qweight.contiguous(), zeros.contiguous(), scales.contiguous(), g_idx.contiguous(), y, M, N, K,
        x2d.stride(0), y.stride(0), BITS=bits, EXACT=exact)
    return y


#: decode (up to DECODE_MAX_ROWS input rows): one row per program, multiply-and-reduce; above, tensor-core tiles
_DECODE = Tiled(_matmul, dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=32),
                configs(BLOCK_M=(1,), BLOCK_N=(16, 32, 64, 128), BLOCK_K=(32, 64, 128, 256), num_warps=(1, 2, 4)))
_PREFILL = Tiled(_matmul, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
                 configs(BLOCK_M=(16, 32, 64), BLOCK_N=(64, 128), BLOCK_K=(32, 64)))
