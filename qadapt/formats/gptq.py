"""GPTQ checkpoints: ``quantize_config.json`` / ``config.json`` ``quantization_config``, and the tensors per linear.

The quantized linears of a GPTQ folder are recognised by their tensors (``<module>.qweight``,
``.qzeros``, ``.scales``, optional ``.g_idx`` and ``.bias``); every other tensor (embeddings,
norms, usually ``lm_head``, modules a ``dynamic`` ``-:`` rule left out) is read as it is.

``dynamic`` (GPTQModel): an ordered map ``pattern -> overrides``; a pattern is a regex matched
at the start of the module path (``re.match``), ``+:`` or no prefix applies the overrides
(``bits``, ``group_size``, ``desc_act``, ``sym``), ``-:`` marks the module as not quantized.
The first pattern that matches wins.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FormatError, UnsupportedError
from ..io import read_json

log = logging.getLogger(__name__)

QUANTIZE_CONFIG = "quantize_config.json"
_OVERRIDABLE = ("bits", "group_size", "desc_act", "sym")
#: GPTQ linear tensors, by suffix of the module path.
TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")


@dataclass(frozen=True)
class GPTQLayerConfig:
    """What one module's GPTQ tensors mean."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str


@dataclass(frozen=True)
class GPTQConfig:
    """A checkpoint's GPTQ settings, from the file contents."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str  # "gptq" (v1: stored zero = zero - 1) | "gptq_v2"
    lm_head: bool
    source: str  # the file it came from
    dynamic: tuple[tuple[str, bool, tuple[tuple[str, Any], ...]], ...] = field(default=())

    def for_module(self, path: str) -> GPTQLayerConfig | None:
        """The settings of the module at ``path``; None when a ``-:`` dynamic rule excludes it."""
        values = {k: getattr(self, k) for k in _OVERRIDABLE}
        for pattern, negative, overrides in self.dynamic:
            if re.match(pattern, path):
                if negative:
                    return None
                values.update(dict(overrides))
                break
        return GPTQLayerConfig(int(values["bits"]), int(values["group_size"]), bool(values["desc_act"]),
                               bool(values["sym"]), self.checkpoint_format)

    def describe(self) -> dict[str, Any]:
        """The settings as ``qadapt inspect`` prints them."""
        out = {k: getattr(self, k) for k in (*_OVERRIDABLE, "checkpoint_format", "lm_head", "source")}
        if self.dynamic:
            out["dynamic"] = {("-:" if neg else "+:") + p: dict(o) for p, neg, o in self.dynamic}
        return out


def _quant_dict(folder: Path, config_json: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    qc = folder / QUANTIZE_CONFIG
    from_config = config_json.get("quantization_config")
    if qc.is_file():
        data = read_json(qc, "GPTQ quantize config")
        if not isinstance(data, dict):
            raise FormatError(f"{qc}: expected a JSON object")
        if isinstance(from_config, dict):
            diff = [k for k in ("bits", "group_size", "desc_act", "sym") if k in from_config and k in data
                    and from_config[k] != data[k]]
            if diff:
                log.warning("%s and config.json's quantization_config disagree on %s; using %s", qc,
                            ", ".join(diff), qc.name)
        return data, str(qc)
    if isinstance(from_config, dict) and str(from_config.get("quant_method", "")).lower() == "gptq":
        return from_config, str(folder / "config.json")
    return None


def _check_settings(where: str, what: str, values: dict[str, Any]) -> None:
    """``bits`` 2/3/4/8, ``group_size`` -1 or positive (integers, not booleans), ``desc_act``/``sym`` booleans."""
    for k, v in values.items():
        if k in ("bits", "group_size"):
            ok = isinstance(v, int) and not isinstance(v, bool) and (
                v in (2, 3, 4, 8) if k == "bits" else (v == -1 or v > 0))
            want = "2, 3, 4 or 8" if k == "bits" else "-1 (one group per column) or a positive integer"
        else:
            ok, want = isinstance(v, bool), "true or false"
        if not ok:
            raise FormatError(f"{where}: {what}GPTQ `{k}` must be {want}, got {v!r}")


def read_gptq_config(folder: str | Path, config_json: dict[str, Any]) -> GPTQConfig | None:
    """The GPTQ settings of a transformers folder, or None when it is not a GPTQ checkpoint."""
    folder = Path(folder)
    found = _quant_dict(folder, config_json)
    if found is None:
        return None
    d, where = found
    method = str(d.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise UnsupportedError(f"{where}: quant_method {method!r} is not GPTQ; qadapt reads GPTQ, bitsandbytes and GGUF")
    fmt = str(d.get("checkpoint_format", d.get("format", "gptq"))).lower()
    if d.get("is_marlin_format"):
        fmt = "marlin"
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported; qadapt reads "
                               "`gptq` (v1) and `gptq_v2` (re-save the model with GPTQModel in one of those)")
    pack = str(d.get("pack_dtype", "int32")).lower().removeprefix("torch.")
    if pack != "int32":
        raise UnsupportedError(f"{where}: GPTQ pack_dtype {pack!r} is not supported; qadapt reads int32")
    if "bits" not in d:
        raise FormatError(f"{where}: GPTQ config needs integer `bits` (2, 3, 4 or 8)")
    _check_settings(where, "", {k: d[k] for k in _OVERRIDABLE if k in d})
    bits, group = d["bits"], d.get("group_size", 128)
    dynamic = []
    raw_dynamic = d.get("dynamic") or {}
    if not isinstance(raw_dynamic, dict):
        raise FormatError(f"{where}: `dynamic` must be an object of pattern -> overrides")
    for key, overrides in raw_dynamic.items():
        negative = key.startswith("-:")
        pattern = key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as e:
            raise FormatError(f"{where}: dynamic pattern {key!r} is not a valid regex ({e})") from None
        if not isinstance(overrides, dict):
            raise FormatError(f"{where}: dynamic pattern {key!r} must map to an object of overrides")
        kept = tuple((k, v) for k, v in overrides.items() if k in _OVERRIDABLE)
        _check_settings(where, f"dynamic pattern {key!r}: ", dict(kept))
        dynamic.append((pattern, negative, kept))
    return GPTQConfig(bits=bits, group_size=group, desc_act=bool(d.get("desc_act", False)),
                      sym=bool(d.get("sym", True)), checkpoint_format=fmt, lm_head=bool(d.get("lm_head", False)),
                      source=where, dynamic=tuple(dynamic))


def module_tensor_names(module_path: str) -> dict[str, str]:
    """GPTQ tensor role -> checkpoint name for the module at ``module_path``."""
    return {k: f"{module_path}.{k}" for k in TENSORS}
