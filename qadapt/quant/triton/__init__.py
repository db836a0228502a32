"""Triton kernels: GGUF blocks, GPTQ codes and bitsandbytes weights multiplied in place (:mod:`.ggml`,
:mod:`.gptq`, :mod:`.bnb`) and many adapters per batch (:mod:`.bgmv`).

They run on NVIDIA GPUs, and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), where the tests
compare them with gguf-py's, GPTQ's and bitsandbytes' dequantization and torch. Triton is optional
(``pip install 'qadapt[cuda]'``; torch's CUDA wheels bring it): :func:`available` says whether a tensor on ``device`` can use them.
"""

from __future__ import annotations

import os

import torch

from ...errors import UnsupportedError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device | str) -> bool:
    """True when Triton is installed and can run on ``device`` (a CUDA device, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and interpreting())


def require(device: torch.device | str, what: str) -> None:
    if not available(device):
        where = torch.device(device).type
        hint = ("install Triton (pip install 'qadapt[cuda]')" if where == "cuda" else
                "Triton runs on CPU only under its interpreter (TRITON_INTERPRET=1, set before Python starts)")
        raise UnsupportedError(f"{what} needs Triton on {where}: {hint}")
