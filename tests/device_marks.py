"""Where the device-path tests run: the Triton kernels under the CPU interpreter where there is no GPU
(``TRITON_INTERPRET=1``, set by conftest.py before Triton is imported), on CUDA where there is one."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: the interpreter tests (kernels="triton" on the CPU); on a GPU machine the CUDA twins run instead
interpreter = pytest.mark.skipif(torch.cuda.is_available() and not INTERPRETED,
                                 reason="the CPU interpreter tests run where there is no GPU")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tools/gpu_check.py runs these)")


def require(where: str) -> dict:
    """Skip unless ``where`` can run here ("triton": the CPU interpreter; "cuda": a GPU); qadapt.load's
    arguments for it."""
    pytest.importorskip("triton")
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (tools/gpu_check.py runs it)")
    if where == "triton" and torch.cuda.is_available() and not INTERPRETED:
        pytest.skip("the interpreter case runs where there is no GPU")
    return {"device": "cuda"} if where == "cuda" else {"kernels": "triton"}
