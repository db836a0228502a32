"""bitsandbytes checkpoints as transformers saves them, and quantize-on-load settings.

A 4-bit linear is stored as ``<module>.weight`` (uint8, packed) plus ``<module>.weight.absmax``,
``.weight.quant_map``, with double quantization ``.weight.nested_absmax`` and
``.weight.nested_quant_map``, and ``.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a
uint8 tensor holding JSON (quant type, blocksize, dtype, shape, nested blocksize / offset).
An 8-bit linear is ``<module>.weight`` int8 [out, in] plus ``<module>.SCB`` (float32, one
scale per row) and ``<module>.weight_format``. The settings are in ``config.json``'s
``quantization_config`` (``quant_method: bitsandbytes``). Modules transformers did not
convert (``lm_head`` and ``llm_int8_skip_modules``) are plain dense tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FormatError, UnsupportedError

#: Entries of a 4-bit quant state, by suffix of ``<module>.weight.``.
STATE_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
STATE_JSON = ("quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BnbConfig:
    """bitsandbytes settings: from a checkpoint's ``quantization_config`` or ``quant=`` on load."""

    quant_type: str  # "nf4" | "fp4" | "int8"
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    threshold: float = 6.0  # LLM.int8() outlier threshold
    skip_modules: tuple[str, ...] = ()
    source: str = ""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_type": self.quant_type, "source": self.source}
        if self.quant_type == "int8":
            out["llm_int8_threshold"] = self.threshold
        else:
            out["double_quant"] = self.double_quant
            out["compute_dtype"] = str(self.compute_dtype).removeprefix("torch.")
        if self.skip_modules:
            out["skip_modules"] = list(self.skip_modules)
        return out


def _dtype(value: Any, where: str) -> torch.dtype:
    if value is None:
        return torch.float32
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise UnsupportedError(f"{where}: bnb_4bit_compute_dtype {value!r} is not supported; use one of "
                               f"{', '.join(_DTYPES)}")
    return _DTYPES[name]


def read_bnb_config(config_json: dict[str, Any], where: str) -> BnbConfig | None:
    """The bitsandbytes settings in ``config.json``, or None when it is not a bitsandbytes checkpoint."""
    qc = config_json.get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method", "")).lower() != "bitsandbytes":
        return None
    four, eight = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit")), bool(
        qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
    if four == eight:
        raise FormatError(f"{where}: quantization_config must set exactly one of load_in_4bit / load_in_8bit")
    qtype = "int8" if eight else str(qc.get("bnb_4bit_quant_type", "fp4")).lower()
    if qtype not in ("nf4", "fp4", "int8"):
        raise UnsupportedError(f"{where}: bnb_4bit_quant_type {qtype!r} is not supported; use nf4 or fp4")
    return BnbConfig(
        quant_type=qtype, double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=_dtype(qc.get("bnb_4bit_compute_dtype"), where),
        threshold=float(qc.get("llm_int8_threshold", 6.0)),
        skip_modules=tuple(qc.get("llm_int8_skip_modules") or ()), source=where,
    )


def module_4bit_state(has, weight_name: str) -> dict[str, str]:
    """quant-state key (as bitsandbytes' ``QuantState.from_dict`` wants it) -> checkpoint name,
    for the 4-bit weight ``weight_name``; empty when it is not a 4-bit bitsandbytes weight."""
    if not any(has(f"{weight_name}.{k}") for k in STATE_JSON):
        return {}
    return {k: f"{weight_name}.{k}" for k in (*STATE_4BIT, *STATE_JSON) if has(f"{weight_name}.{k}")}


def module_int8_scb(has, weight_name: str) -> str | None:
    """The checkpoint name of the ``SCB`` of an 8-bit weight, or None."""
    name = weight_name.removesuffix(".weight") + ".SCB"
    return name if has(name) else None
