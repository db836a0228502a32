"""GGUF tensor types qadapt runs, as data: block geometry comes from gguf-py's table."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

#: Types a base-model weight may have, in the order ``qadapt inspect`` lists them.
GGML_TYPE_NAMES: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
)


def ggml_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def block_geometry(name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGUF type."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]
