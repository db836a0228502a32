"""Compile every device kernel variant for an NVIDIA GPU without one (run by tests/test_triton_compile.py).

Triton lowers a kernel to PTX and ``ptxas`` (shipped in Triton's wheel) assembles it for a target architecture
with no GPU present: what the CPU interpreter cannot show (types, layouts, tile shapes the compiler refuses)
shows here. Every decode branch (each GGUF type, GPTQ bit width, bitsandbytes format and rounding) at the
fixed tiles for sm_90 (H200, the prepared GPU run's machine; ~15 s); with ``--all`` also for sm_80 (A100) and
every autotuning config of each kernel at one representative branch (~6.5 minutes on 2 cores). Run in a
process without ``TRITON_INTERPRET`` (Triton reads it at import). Prints one line per kernel group; exits
non-zero on the first failure, naming the kernel and its constants.
"""

from __future__ import annotations

import os
import sys

assert "TRITON_INTERPRET" not in os.environ, "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qadapt.quant.triton import bgmv, bnb, ggml, gptq  # noqa: E402

#: the prepared GPU run's machine (H200: sm_90) and the previous generation (A100: sm_80)
TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
GGML = {"x": "*fp32", "y": "*fp32", "w": "*u8", "out": "*fp32"}
GPTQ = {"x": "*fp32", "qw": "*i32", "zeros": "*i32", "scales": "*fp16", "g_idx": "*i32", "y": "*fp32"}
BGMV = {"x": "*fp32", "a": "*fp32", "idx": "*i32", "t": "*fp32", "bt": "*fp32", "scale": "*fp32", "y": "*fp32"}


def bnb_types(fmt: int) -> dict:
    return {"x": "*fp32", "q": "*i8" if fmt == 2 else "*u8", "absmax": "*u8" if fmt == 1 else "*fp32",
            "code": "*fp32", "absmax2": "*fp32", "code2": "*fp32", "offset": "*fp32", "y": "*fp32"}


def compile_one(fn, types: dict, consts: dict, num_warps: int = 4, target=TARGETS[0]) -> None:
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    try:
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                       options={"num_warps": num_warps})
    except Exception as e:  # noqa: BLE001 - reported with the variant, then the run fails
        print(f"FAILED {fn.__name__} {consts} num_warps={num_warps} {target}: {type(e).__name__}: {e}")
        sys.exit(1)


def configs(tiled) -> list:
    return [(c.kwargs, c.num_warps) for c in tiled.tuned.configs]


def main(everything: bool) -> None:
    n = 0
    for target in TARGETS if everything else TARGETS[:1]:
        for qt in ggml.TYPES.values():
            compile_one(ggml._gemv, GGML, {"QT": qt, "BLOCK_N": 64}, target=target)
            compile_one(ggml._matmul, GGML, {"QT": qt, "BLOCK_M": 16, "BLOCK_N": 64, "EXACT": False}, target=target)
            compile_one(ggml._dequantize, GGML, {"QT": qt, "BLOCK_N": 32}, target=target)
            n += 3
        for bits in gptq.BITS:
            for bm in (1, 16):
                compile_one(gptq._matmul, GPTQ, {"BITS": bits, "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32,
                                                 "EXACT": False}, target=target)
                n += 1
        for fmt, rounds in ((0, (0, 1, 2)), (1, (0, 1, 2)), (2, (0,))):
            for rnd in rounds:
                for bm in (1, 16):
                    compile_one(bnb._matmul, bnb_types(fmt), {"FMT": fmt, "ROUND": rnd, "BLOCK_M": bm, "BLOCK_N": 64,
                                                              "BLOCK_K": 32, "EXACT": False}, target=target)
                    n += 1
        compile_one(bgmv._shrink, BGMV, {"R_PAD": 64, "BLOCK_K": 64}, target=target)
        compile_one(bgmv._expand, BGMV, {"R_PAD": 64, "BLOCK_N": 64}, target=target)
        n += 2
    for x in ("*bf16", "*fp16"):  # activations in half precision (a model loaded with dtype=bfloat16 / float16)
        compile_one(ggml._gemv, {**GGML, "x": x}, {"QT": ggml.TYPES["Q4_K"], "BLOCK_N": 64})
        compile_one(ggml._matmul, {**GGML, "x": x}, {"QT": ggml.TYPES["Q4_K"], "BLOCK_M": 16, "BLOCK_N": 64,
                                                     "EXACT": False})
        for bm in (1, 16):
            compile_one(gptq._matmul, {**GPTQ, "x": x}, {"BITS": 4, "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 32,
                                                         "EXACT": False})
            compile_one(bnb._matmul, {**bnb_types(1), "x": x}, {"FMT": 1, "ROUND": 1, "BLOCK_M": bm, "BLOCK_N": 64,
                                                                "BLOCK_K": 32, "EXACT": False})
        compile_one(bgmv._shrink, {**BGMV, "x": x}, {"R_PAD": 64, "BLOCK_K": 64})
        compile_one(bgmv._expand, {**BGMV, "y": x}, {"R_PAD": 64, "BLOCK_N": 64})
        n += 8
    print(f"branches: {n} variants compiled", flush=True)
    if not everything:
        return
    m = 0
    for kw, w in configs(ggml._GEMV):
        compile_one(ggml._gemv, GGML, {"QT": ggml.TYPES["Q4_K"], **kw}, w)
        m += 1
    for kw, w in configs(ggml._MATMUL):
        compile_one(ggml._matmul, GGML, {"QT": ggml.TYPES["Q4_K"], "EXACT": False, **kw}, w)
        m += 1
    for tiled in (gptq._DECODE, gptq._PREFILL):
        for kw, w in configs(tiled):
            compile_one(gptq._matmul, GPTQ, {"BITS": 4, "EXACT": False, **kw}, w)
            m += 1
    for tiled in (bnb._DECODE, bnb._PREFILL):
        for kw, w in configs(tiled):
            compile_one(bnb._matmul, bnb_types(1), {"FMT": 1, "ROUND": 2, "EXACT": False, **kw}, w)
            m += 1
    print(f"autotuning configs: {m} variants compiled", flush=True)


if __name__ == "__main__":
    main("--all" in sys.argv[1:])
