"""What every tiled quantized matmul here shares: the input tile, the tile product at the chosen precision, the
output store. The kernels differ only in how they decode a weight tile (:mod:`.ggml`, :mod:`.gptq`, :mod:`.bnb`).

Precision: ``EXACT`` multiplies float32 tiles in IEEE float32 (what the CPU interpreter runs: the reference
numbers up to accumulation order); otherwise both tiles are rounded to float16 and multiplied on tensor cores
with float32 accumulation (relative rounding 2^-11 per factor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


#: input rows up to which the kernels take their decode form (one row per program)
DECODE_MAX_ROWS = 4


class Tiled:
    """A kernel launched with fixed tile sizes under Triton's interpreter (the tests) and autotuned over
    ``configs`` on a GPU, keyed on the weight's shape (``N``, ``K``): the best tiles differ per GPU and shape and
    are measured there, once per shape (at a CUDA graph's warm-up, never inside a capture). The kernels store
    their output (never accumulate into it), so the tuning runs may repeat them."""

    def __init__(self, fn, fixed: dict, configs: list):
        self.fn, self.fixed = fn, fixed
        self.tuned = triton.autotune(configs=configs, key=["N", "K"])(fn)

    def launch(self, grid, *args, **consts) -> None:
        """``grid``: meta-parameters -> the launch grid."""
        from . import interpreting

        if interpreting():
            self.fn[grid](*args, **consts, **self.fixed)
        else:
            self.tuned[grid](*args, **consts)


def configs(**choices) -> list:
    """Every combination of the given tile sizes (``num_warps`` among them) as autotuning configs."""
    import itertools

    warps = choices.pop("num_warps", (4,))
    keys = list(choices)
    return [triton.Config(dict(zip(keys, vals)), num_warps=w)
            for vals in itertools.product(*choices.values()) for w in warps]


def start(x2d: torch.Tensor, K: int, N: int, what: str, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's input checked ([M, K], on the device of the ``what`` tensors ``weights``) and made contiguous,
    and its float32 output [M, N]."""
    if x2d.dim() != 2 or x2d.shape[1] != K:
        raise ValueError(f"input must be [M, {K}], got {list(x2d.shape)}")
    if len({t.device for t in (x2d, *weights)}) != 1:
        raise ValueError(f"input on {x2d.device}, {what} tensors on {', '.join(sorted({str(t.device) for t in weights}))}")
    x2d = x2d.contiguous()
    return x2d, torch.empty(x2d.shape[0], N, dtype=torch.float32, device=x2d.device)


@triton.jit
def x_tile(x, m, k, kmask, M, sxm):
    """Input rows ``m`` [BM] at columns ``k`` [BK] (``kmask``: the columns that exist), zeros elsewhere."""
    return tl.load(x + m[:, None].to(tl.int64) * sxm + k[None, :], mask=(m[:, None] < M) & kmask[None, :],
                   other=0.0)


@triton.jit
def mma(acc, xt, w, EXACT: tl.constexpr, BLOCK_M: tl.constexpr):
    """``acc + xt @ w`` (xt [BM, BK], w [BK, BN], float32 accumulator). One input row (``BLOCK_M`` 1, a decode
    step): a float32 multiply-and-reduce, no tensor cores (``tl.dot`` needs 16 rows; the weight's bytes are the
    cost there)."""
    if BLOCK_M == 1:
        return acc + tl.sum(tl.trans(xt.to(tl.float32)) * w, axis=0)[None, :]
    if EXACT:
        return acc + tl.dot(xt.to(tl.float32), w, input_precision="ieee")
    return acc + tl.dot(xt.to(tl.float16), w.to(tl.float16))


@triton.jit
def store(y, acc, m, n, M, N, sym):
    tl.store(y + m[:, None].to(tl.int64) * sym + n[None, :], acc, mask=(m[:, None] < M) & (n[None, :] < N))
