"""Quantized linears of a transformers folder: which reader builds them (GPTQ, bitsandbytes, bnb on load).

:func:`open_quant_reader` looks at the checkpoint's config (``quantize_config.json`` /
``quantization_config``) and the ``quant=`` argument and returns a reader, or None for a
plain full-precision load. The transformers source asks the reader first for every linear;
a reader answers None for tensors it does not own (embeddings, unquantized ``lm_head``,
modules a ``dynamic`` rule or ``llm_int8_skip_modules`` left out), which are then read dense.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import FormatError, InputError, UnsupportedError
from ..quant.base import BaseLinear
from .bnb import BnbConfig, module_4bit_state, module_int8_scb, read_bnb_config
from .gptq import GPTQConfig, module_tensor_names, read_gptq_config

log = logging.getLogger(__name__)


class _Reader:
    base_format: str

    def __init__(self, ckpt, mode: str, dtype: torch.dtype):
        self.ckpt, self.mode, self.dtype = ckpt, mode, dtype
        self.counts: dict[str, tuple[int, int]] = {}  # qtype -> (layers, bytes in memory)

    def _count(self, layer: BaseLinear) -> BaseLinear:
        n, b = self.counts.get(layer.qtype, (0, 0))
        self.counts[layer.qtype] = (n + 1, b + layer.nbytes)
        return layer

    def has(self, name: str) -> bool:
        """Whether ``name`` (a ``.weight`` the builder asks for) is a quantized linear stored under other names."""
        return False

    def _raw(self, name: str) -> torch.Tensor:
        return self.ckpt.tensor(name, raw=True)

    def _bias(self, weight_name: str) -> torch.Tensor | None:
        name = weight_name.removesuffix(".weight") + ".bias"
        return self._raw(name).float().reshape(-1) if self.ckpt.has(name) else None

    @property
    def quant(self) -> str:
        """The ``--quant`` name describing the base (most layers' qtype)."""
        return max(self.counts.items(), key=lambda kv: kv[1][0])[0] if self.counts else "?"


class GPTQReader(_Reader):
    """Linears with ``qweight`` / ``qzeros`` / ``scales`` tensors become :class:`GPTQLinear`."""

    base_format = "gptq"

    def __init__(self, ckpt, cfg: GPTQConfig, mode: str, dtype: torch.dtype):
        super().__init__(ckpt, mode, dtype)
        self.cfg = cfg

    def has(self, name: str) -> bool:
        return self.ckpt.has(name.removesuffix(".weight") + ".qweight")

    def linear(self, name: str, shape: tuple[int, int], transposed: bool = False) -> BaseLinear | None:
        from ..quant.gptq import make_gptq_linear

        module = name.removesuffix(".weight")
        names = module_tensor_names(module)
        if not self.ckpt.has(names["qweight"]):
            return None
        lc = self.cfg.for_module(module)
        if lc is None:
            raise FormatError(f"{self.ckpt.folder}: `{module}` has GPTQ tensors but a `-:` dynamic rule in "
                              f"{self.cfg.source} marks it as not quantized")
        tensors = {k: self._raw(n) for k, n in names.items() if self.ckpt.has(n)}
        layer = make_gptq_linear(tensors, bits=lc.bits, group_size=lc.group_size,
                                 checkpoint_format=lc.checkpoint_format, shape=shape, mode=self.mode,
                                 dtype=self.dtype, name=f"{self.ckpt.folder}: {module}")
        return self._count(layer)

    def describe(self) -> dict[str, Any]:
        return {"method": "gptq", **self.cfg.describe()}


class BnbReader(_Reader):
    """Pre-quantized bitsandbytes weights (4-bit quant states, 8-bit ``SCB``) become :class:`BnbLinear`."""

    base_format = "bnb"

    def __init__(self, ckpt, cfg: BnbConfig, mode: str, dtype: torch.dtype):
        super().__init__(ckpt, mode, dtype)
        self.cfg = cfg

    def linear(self, name: str, shape: tuple[int, int], transposed: bool = False) -> BaseLinear | None:
        from ..quant.base import DenseLinear
        from ..quant.bnb import BnbLinear

        where = f"{self.ckpt.folder}: {name.removesuffix('.weight')}"
        state = module_4bit_state(self.ckpt.has, name)
        scb = module_int8_scb(self.ckpt.has, name)
        if state:
            layer = BnbLinear.from_4bit(self._raw(name), {k: self._raw(n) for k, n in state.items()},
                                        self._bias(name), compute_dtype=self.cfg.compute_dtype, name=where)
        elif scb is not None and self.ckpt.dtype_name(name) == "I8":
            layer = BnbLinear.from_int8(self._raw(name), self._raw(scb), self._bias(name),
                                        threshold=self.cfg.threshold, compute_dtype=self.cfg.compute_dtype,
                                        name=where)
        else:
            return None
        if (layer.out_features, layer.in_features) != tuple(shape):
            raise FormatError(f"{where}: bitsandbytes weight is [out={layer.out_features}, in={layer.in_features}], "
                              f"the config implies {list(shape)}")
        self._count(layer)
        if self.mode == "dequantize":
            return DenseLinear(layer.dequantize(self.dtype), layer.bias, qtype=layer.qtype)
        return layer

    def describe(self) -> dict[str, Any]:
        return {"method": "bitsandbytes", **self.cfg.describe()}


class BnbQuantizer(_Reader):
    """``quant="nf4"|"fp4"|"int8"``: the block linears of a full-precision folder quantized on load
    through bitsandbytes; ``lm_head`` and embeddings stay dense, as transformers' integration keeps them."""

    base_format = "bnb"

    def __init__(self, ckpt, cfg: BnbConfig, mode: str, dtype: torch.dtype, layer_map):
        super().__init__(ckpt, mode, dtype)
        self.cfg, self.layer_map = cfg, layer_map

    def linear(self, name: str, shape: tuple[int, int], transposed: bool = False) -> BaseLinear | None:
        from ..quant.bnb import make_bnb_linear

        hit = self.layer_map.match_path(name.removesuffix(".weight"))
        if hit is None or not hit[0].per_block or hit[0].role == "router":  # lm_head / tied embeddings / a
            return None  # mixture-of-experts router: not converted (as transformers' bitsandbytes integration)
            return None
        w = self.ckpt.tensor(name)
        w = w.T if transposed else w
        if tuple(w.shape) != tuple(shape):
            raise FormatError(f"{self.ckpt.folder}: tensor `{name}` has shape {list(w.shape)}, the config "
                              f"implies {list(shape)}")
        layer = make_bnb_linear(w, self._bias(name), self.cfg.quant_type, mode=self.mode,
                                dtype=self.cfg.compute_dtype, double_quant=self.cfg.double_quant,
                                threshold=self.cfg.threshold, name=f"{self.ckpt.folder}: {name}")
        return self._count(layer)

    def describe(self) -> dict[str, Any]:
        return {"method": "bitsandbytes (quantized on load)", **self.cfg.describe()}


def open_quant_reader(ckpt, quant: str | None, mode: str, dtype: torch.dtype, layer_map, *,
                      double_quant: bool = False) -> GPTQReader | BnbReader | BnbQuantizer | None:
    """The reader for a transformers folder's quantized linears, or None (a full-precision load,
    or ``quant`` naming a GGUF type, which the caller handles).

    Pre-quantized folders (GPTQ, bitsandbytes) keep their quantization: a ``quant`` is refused.
    ``quant="gptq-*"`` is refused too: GPTQ needs calibration data, it is not a load-time step.
    """
    from ..layer_maps import base_format_of

    where = str(ckpt.folder / "config.json")
    gptq = read_gptq_config(ckpt.folder, ckpt.config)
    bnb = read_bnb_config(ckpt.config, where) if gptq is None else None
    if gptq is None and bnb is None:
        qc = ckpt.config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method"):
            raise UnsupportedError(f"{where}: quant_method {qc.get('quant_method')!r} is not supported; qadapt reads "
                                   "GPTQ and bitsandbytes checkpoints, and GGUF files")
    fmt, qtype = base_format_of(quant) if quant is not None else ("full", None)
    if (gptq or bnb) and quant is not None:
        kind = "GPTQ" if gptq else "bitsandbytes"
        raise InputError(f"{ckpt.folder} is already quantized ({kind}); load it without quant={quant!r}")
    if gptq is not None:
        return GPTQReader(ckpt, gptq, mode, dtype)
    if bnb is not None:
        return BnbReader(ckpt, bnb, mode, dtype)
    if fmt == "gptq":
        raise UnsupportedError(
            f"quant={quant!r}: GPTQ is not a quantize-on-load format (it needs calibration data); quantize the "
            "model with GPTQModel and load the resulting folder, or use quant='nf4' / 'int8' (bitsandbytes) or a "
            "GGUF type such as 'Q4_0'")
    if fmt == "bnb":
        from ..quant.bnb import require_bnb

        require_bnb()
        compute = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        cfg = BnbConfig(quant_type=qtype, double_quant=double_quant, compute_dtype=compute,
                        source=f"quant={quant!r}")
        return BnbQuantizer(ckpt, cfg, mode, dtype, layer_map)
    return None


def describe_folder(folder) -> dict[str, Any]:
    """``qadapt inspect`` for a transformers folder, from its config and safetensors headers alone:
    the architecture, the GPTQ / bitsandbytes settings, and every targetable linear's stored type
    and bytes (all of its tensors: codes, scales, zeros, quant state, bias)."""
    from ..layer_maps import hf_layer_map
    from .hf import HFCheckpoint

    ckpt = HFCheckpoint(folder)
    lm = hf_layer_map(ckpt.config, ckpt.folder / "config.json")
    gptq = read_gptq_config(ckpt.folder, ckpt.config)
    bnb = read_bnb_config(ckpt.config, str(ckpt.folder / "config.json")) if gptq is None else None
    layers = []
    for row in lm.modules(lm.normalise_hf_config(ckpt.config)):
        names = [n for n in ckpt.where if n.startswith(row.path + ".")]
        nbytes = sum(ckpt.headers[n]["data_offsets"][1] - ckpt.headers[n]["data_offsets"][0] for n in names)
        if f"{row.path}.qweight" in ckpt.where:
            lc = gptq.for_module(row.path) if gptq else None
            qtype = f"gptq-{lc.bits}bit" if lc else "gptq-?"
        elif bnb is not None and (module_4bit_state(ckpt.has, row.path + ".weight")
                                  or module_int8_scb(ckpt.has, row.path + ".weight")):
            qtype = bnb.quant_type
        elif names:
            qtype = ckpt.dtype_name(row.path + ".weight") if ckpt.has(row.path + ".weight") else "?"
        else:
            qtype = "missing"
        layers.append({"path": row.path, "qtype": qtype, "bytes": nbytes})
    quant = {"method": "gptq", **gptq.describe()} if gptq else ({"method": "bitsandbytes", **bnb.describe()}
                                                                 if bnb else None)
    return {
        "path": str(ckpt.folder), "file_size": ckpt.file_size, "architecture": lm.architecture,
        "format": "gptq" if gptq else ("bnb" if bnb else "full"), "quantization": quant,
        "tensor_types": [{"type": k, "count": n, "bytes": b} for k, (n, b) in sorted(ckpt.type_counts().items())],
        "tensor_count": len(ckpt.where), "layers": layers,
    }
