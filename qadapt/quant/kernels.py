"""Which CPU kernel runs each GGUF type's matmul, and the torch-side kernels themselves.

This module is format-agnostic: it knows 4-bit codes with per-group scales and
zeros, and "a function that dequantizes a range of rows". ``ggml.py`` maps each
GGUF type onto one of these paths.

==========================  ===============  ==================================================
GGUF type                   path             why
==========================  ===============  ==================================================
F32 (compute float32),      ``dense``        the mapped array *is* the weight in the compute
BF16 (compute bf16)                          dtype: matmul on it directly (no copy)
Q4_0, Q4_1, Q4_K            ``int4pack``     exactly ``(q - 8) * scale + zero`` per 32 weights:
                                             torch's CPU int4 weight-only kernel (bf16)
Q8_0, Q5_0, Q5_1, Q2_K,     ``blockwise``    no exact torch kernel (5/6/8-bit codes, groups of
Q3_K, Q5_K, Q6_K, IQ4_NL,                    16, non-linear codebooks): dequantize a chunk of
IQ4_XS, F16, F32 (bf16),                     rows into a bounded scratch buffer, matmul, repeat
BF16 (float32)
==========================  ===============  ==================================================

On top of the table, every type except F32 in float32 runs small inputs through the
native kernels (:mod:`.native`, C compiled on first use) when they are available: up to
:data:`NATIVE_MAX_BATCH` input rows (decode) on the ``blockwise`` path and up to
:data:`NATIVE_INT4_MAX_BATCH` on the ``int4pack`` path, the weights are multiplied into x
straight from the block bytes in float32 (gguf-py's weights bit for bit, float32
accumulation). 5632x2048, one thread, one input row (CPU ms, native vs before): Q8_0 1.1
vs 14, F16 1.1 vs 6.4, Q6_K 1.5 vs 26, Q5_K 1.8 vs 43, Q4_K 1.5 vs int4pack 2.0 (bf16).
Each extra input row costs most of that again, so larger inputs (prefills) take the
table's path, whose ``blockwise`` dequantization also runs natively when it can (into
a reused scratch: ~10x faster than torch's, same bits).

``kernels="q8"`` (opt-in, llama.cpp's arithmetic) adds the ``q8`` path for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/
IQ4_NL/Q4_K/Q5_K/Q6_K: inputs rounded to 8 bits per block of 32 and integer dot products (see
``native/ggml_kernels.c``); Q4_0, Q8_0, Q4_K and Q6_K in an 8-row interleaved layout for every input
size (5632x2048, 2 threads, one row, in cache: Q4_0 0.09 ms vs 0.47 exact native, Q8_0 0.09 vs 0.38),
the others on the file's blocks up to :data:`Q8_ROW_MAX_BATCH` rows.

``int4pack`` falls back to ``blockwise`` when the kernel's shape rules fail
(out_features not a multiple of 16, in_features not a multiple of the group), and
hands inputs of more than :data:`INT4PACK_MAX_BATCH` rows (prefills) to ``blockwise``
in bf16: that kernel's cost grows linearly with the rows (5632x2048 Q4_K, one thread:
0.7 ms at 1 row, 19 ms at 64, 38 ms at 128, 149 ms at 512), while dequantizing once
and running the dense bf16 GEMM costs ~20-40 ms at any of those sizes.
``torch._weight_int8pack_mm`` is not used for Q8_0: it has one scale per output
row, Q8_0 one per 32 weights, so it cannot reproduce Q8_0 exactly.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

#: GGUF types that take the int4pack path (each also says how in its ``int4_blocks``).
INT4PACK_TYPES: frozenset[str] = frozenset({"Q4_0", "Q4_1", "Q4_K"})
#: GGUF types stored as a plain torch dtype: ``dense`` when that is the compute dtype.
STORED_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "BF16": torch.bfloat16}

#: Group sizes the CPU int4 kernel accepts, and its rule on the number of output rows.
INT4PACK_GROUPS: tuple[int, ...] = (32, 64, 128, 256)
INT4PACK_ROW_MULTIPLE = 16
#: Input rows above which the int4pack path dequantizes blockwise instead (see above).
INT4PACK_MAX_BATCH = 64
#: Input rows up to which the native kernel replaces the blockwise path. 5632x2048, one thread
#: (ms, native vs native dequantize + float32 GEMM): Q8_0 1.3/4.5 at 1 row, 8.4/15.9 at 12,
#: 10.5/10.9 at 16; Q6_K 12.9/16.7 at 12, 16.3/12.3 at 16.
NATIVE_MAX_BATCH = 12
#: ... and the int4pack path: Q4_K 5632x2048 native/int4pack 1.5/2.0 ms at 1 row, but
#: 2.8/1.9 at 2 and 3.5/2.4 at 4 (int4pack's cost per extra row is lower).
NATIVE_INT4_MAX_BATCH = 1
#: False: when the native kernels load, Q4_0/Q4_1/Q4_K skip the int4 repack and take the
#: blockwise path (native up to NATIVE_MAX_BATCH rows): in-place memory is then the file
#: plus the loader's own copies (Q4_0 bench model, RSS over baseline: 1.37x the file
#: instead of 2.40x; the q/k row un-permutation copies are most of the 0.37), float32
#: exact, faster to load and at one row faster (Q4_0 decode 9.2 vs 7.2 tok/s, one thread),
#: but 2-12 rows cost ~1.5x int4pack's. True keeps today's behaviour.
INT4PACK_WITH_NATIVE = True
#: Rows converted at once while packing, bounding the int32 staging buffer.
_PACK_CHUNK_ROWS = 1024
#: Upper bound on the blockwise path's scratch buffer.
SCRATCH_BYTES = 8 << 20


#: ``kernels=`` choices of the in-place GGUF layers: ``auto`` (the default: ``q8`` on every type the
#: native library runs that way on this CPU, else the fastest torch path, ``int4pack`` for the 4-bit
#: types), ``exact`` (float32 activations and gguf-py's weights on every type: the native float32
#: kernels and float32 dequantization, never ``int4pack``'s bf16) or ``q8`` (llama.cpp's arithmetic:
#: activations quantized to 8 bits per block of 32, integer dot products; see ``native/ggml_kernels.c``
#: for its bound; as ``auto`` where the type or CPU cannot) or ``triton`` (the Triton kernels: CUDA, or the CPU
#: under ``TRITON_INTERPRET=1``; GGUF Q8_0/Q4_0/Q4_K/Q6_K multiplied from the file's blocks, the other types
#: dequantized a chunk of rows at a time on the device; a batch's adapters in device slots, one gathered
#: kernel pair per layer: :mod:`qadapt.quant.triton`).
KERNELS: tuple[str, ...] = ("auto", "exact", "q8", "triton")
#: the environment variable that sets the default (``auto`` when unset): the test suite, whose references
#: are float32, sets ``exact``
KERNELS_ENV = "QADAPT_KERNELS"
#: Input rows up to which ``q8`` runs on the file's layout (types without the 8-row layout);
#: larger inputs dequantize blockwise (Q5_K 5632x2048, 2 threads: 8 rows 1.9 ms vs 128 rows ~30 ms).
Q8_ROW_MAX_BATCH = 8


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        from ..errors import InputError

        raise InputError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")


def resolve_kernels(kernels: str | None) -> str:
    """``kernels`` as given, or the default: ``$QADAPT_KERNELS``, else ``auto``."""
    import os

    if kernels is None:
        kernels = os.environ.get(KERNELS_ENV, "").strip() or "auto"
        if kernels not in KERNELS:
            from ..errors import InputError

            raise InputError(f"${KERNELS_ENV} must be one of {', '.join(KERNELS)}, got {kernels!r}")
    check_kernels(kernels)
    return kernels


def kernel_path(qtype: str, compute_dtype: torch.dtype = torch.float32) -> str:
    """``dense``, ``int4pack`` or ``blockwise`` (before the int4pack shape check)."""
    if STORED_DTYPES.get(qtype) == compute_dtype:
        return "dense"
    return "int4pack" if qtype in INT4PACK_TYPES else "blockwise"


def int4pack_fits(out_features: int, in_features: int, group: int) -> bool:
    """Whether torch's CPU int4 kernel accepts this shape and group size."""
    return (
        group in INT4PACK_GROUPS
        and out_features % INT4PACK_ROW_MULTIPLE == 0
        and in_features % group == 0
    )


class Int4Packed:
    """Weights in the layout of ``torch.ops.aten._weight_int4pack_mm_for_cpu``.

    The kernel computes ``w[n, k] = (q[n, k] - 8) * scale[k // g, n] + zero[k // g, n]``
    (gpt-fast's convention, checked numerically in the tests) with ``x``, scales and
    zeros in bfloat16 and float32 accumulation; bf16 inputs are 20-70x faster than fp32.
    """

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int):
        self.packed = packed  # uint8 [out, in / 2]
        self.scales_and_zeros = scales_and_zeros  # bf16 [in / group, out, 2]
        self.group = group

    @classmethod
    def from_codes(
        cls, codes_fn: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        out_features: int, group: int,
    ) -> "Int4Packed":
        """Pack rows in chunks: ``codes_fn(r0, r1)`` -> (codes [rows, in] in 0..15,
        scale [rows, in/group], zero [rows, in/group]) for output rows r0:r1."""
        packed, sz = [], []
        for r0 in range(0, out_features, _PACK_CHUNK_ROWS):
            codes, scale, zero = codes_fn(r0, min(r0 + _PACK_CHUNK_ROWS, out_features))
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
            sz.append(torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16))
        return cls(torch.cat(packed), torch.cat(sz, dim=1).contiguous(), group)

    def matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """x [m, in] (any float dtype) -> [m, out] bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d.to(torch.bfloat16).contiguous(), self.packed, self.group, self.scales_and_zeros
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


def blockwise_matmul(
    x2d: torch.Tensor, dequant_rows: Callable[[int, int], torch.Tensor],
    out_features: int, in_features: int, compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``x2d @ W.T`` with W produced a chunk of rows at a time by ``dequant_rows(r0, r1)``.

    The scratch (one chunk of dequantized rows) stays within :data:`SCRATCH_BYTES`; the
    result is accumulated as ``out.T`` so every chunk writes a contiguous slice.
    """
    x2d = x2d.to(compute_dtype)
    xt = x2d.t()
    out_t = torch.empty(out_features, x2d.shape[0], dtype=compute_dtype, device=x2d.device)
    step = max(1, SCRATCH_BYTES // (in_features * 4))
    for r0 in range(0, out_features, step):
        r1 = min(r0 + step, out_features)
        w = dequant_rows(r0, r1).to(compute_dtype)
        torch.mm(w, xt, out=out_t[r0:r1])
    return out_t.t()


_local = threading.local()


def scratch(rows: int, cols: int) -> torch.Tensor:
    """A float32 [rows, cols] view of this thread's reusable scratch (>= :data:`SCRATCH_BYTES`).

    Reused because a fresh 8 MiB tensor is fresh pages: first-touch faults cost more
    (~6 ms) than natively dequantizing into it (~0.3 ms). Valid until the next call.
    """
    n = rows * cols
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _local.buf = torch.empty(max(n, SCRATCH_BYTES // 4), dtype=torch.float32)
    return buf[:n].view(rows, cols)


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """A 2-D matmul result back in x's dtype and leading shape, plus the bias: every quantized forward ends so."""
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_features)
