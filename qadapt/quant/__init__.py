"""Quantized base-model layers: the contract (``base``) and one module per format."""

from __future__ import annotations

from .base import BaseLinear, DenseLinear
from .ggml import (
    BLOCK_TYPES, DenseEmbedding, GGMLEmbedding, GGMLLinear, dequantize_array, make_embedding, make_linear,
    take_rows,
)
from .kernels import INT4PACK_TYPES, kernel_path

__all__ = [
    "BaseLinear", "DenseLinear", "GGMLLinear", "GGMLEmbedding", "DenseEmbedding", "BLOCK_TYPES",
    "make_linear", "make_embedding", "dequantize_array", "take_rows", "INT4PACK_TYPES", "kernel_path",
]
