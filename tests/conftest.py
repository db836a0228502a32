"""Shared test setup: tests import their model builders from ``tests/models.py``."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("QADAPT_NO_PROGRESS", "1")
# The suite's references are float32 (transformers, PEFT, gguf-py): models run the exact kernels unless a
# test asks for others; tests/test_default_kernels.py checks what a user gets by default (auto).
os.environ.setdefault("QADAPT_KERNELS", "exact")
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Triton reads its settings when first imported (by any module): without a GPU its kernels run under the
# interpreter (tests/test_triton.py)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama_root(request) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (downloaded once into pytest's cache; tests/llama_sdist.py)."""
    from llama_sdist import sdist_root

    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider (tools/gpu_check.py)
    if cache is None:
        import tempfile

        return sdist_root(Path(tempfile.gettempdir()) / "qadapt-llama-sdist")
    return sdist_root(Path(cache.mkdir("llama-sdist")))
