"""In-situ quantization: full-precision weights into the same GGUF blocks the GGUF path runs.

Quantization is gguf-py's (``gguf.quants.quantize``) for the types it implements, so a
weight quantized here is bit-identical to the one llama.cpp's Python tools would write, and
the layers built from it are the same :class:`~qadapt.quant.ggml.GGMLLinear` (in place) or
:class:`~qadapt.quant.base.DenseLinear` (dequantized) the GGUF loader builds.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .errors import UnsupportedError

log = logging.getLogger(__name__)

#: Types gguf-py can quantize to (its K-quants and IQ types only dequantize).
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def check_quant_type(qtype: str) -> str:
    if qtype not in QUANTIZABLE:
        raise UnsupportedError(
            f"in-situ quantization to {qtype} is not supported (gguf-py has no quantizer for it); "
            f"supported: {', '.join(QUANTIZABLE)}. To run {qtype}, convert with llama.cpp's llama-quantize "
            "and load the .gguf file"
        )
    return qtype


def fits_blocks(cols: int, qtype: str) -> bool:
    import gguf

    return cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0] == 0


def quantize_array(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [rows, cols] -> the GGUF encoding of ``qtype`` (uint8 [rows, bytes] for block types)."""
    import gguf

    check_quant_type(qtype)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == "F32":
        return w
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])


def quantize_weight(w: torch.Tensor, qtype: str, name: str) -> tuple[np.ndarray, str]:
    """A weight [out, in] as (raw GGUF data, type); rows that are not whole blocks stay F32."""
    if not fits_blocks(w.shape[-1], qtype):
        log.warning("%s: %d input features are not whole %s blocks; kept in F32", name, w.shape[-1], qtype)
        return quantize_array(w.detach().float().numpy(), "F32"), "F32"
    return quantize_array(w.detach().float().numpy(), qtype), qtype
