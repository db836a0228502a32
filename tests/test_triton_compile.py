"""The device kernels compile for NVIDIA GPUs, checked without one: Triton lowers each variant to PTX and its
bundled ``ptxas`` assembles it for sm_90 (tests/triton_compile.py). The CPU interpreter runs the kernels' maths
(tests/test_triton.py); this catches what only the compiler refuses (types, layouts, tile shapes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile.py")), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_kernel_branch_compiles_for_sm90():
    """Each GGUF type's decode (GEMV, tiled, dequantize), each GPTQ bit width and bitsandbytes format and
    rounding in their decode and tiled forms, and the gathered LoRA pair; then float32 activations' kernels
    again with bfloat16 and float16 activations."""
    r = _run(timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "branches: 74 variants compiled" in r.stdout, r.stdout


@pytest.mark.slow
def test_every_autotuning_config_compiles_for_sm90_and_sm80():
    """Every branch for sm_80 too, and every autotuning config (tile sizes, warps) of each kernel (~6.5 min)."""
    r = _run("--all", timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "autotuning configs: 144 variants compiled" in r.stdout, r.stdout
