"""transformers checkpoints: a folder with ``config.json`` and safetensors (one file or sharded).

Every shard's header is validated (:func:`qadapt.io.read_safetensors_header`) before
anything is read; tensors are then read through safetensors' memory-mapped ``safe_open``.
:class:`HFSource` answers the decoder builder's requests in transformers' names, as dense
layers or, with ``quant``, quantized in situ into the GGUF layers (:mod:`qadapt.quantize`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from ..errors import FormatError, InputError
from ..io import read_json, read_safetensors_header

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_TORCH_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


class HFCheckpoint:
    """A validated transformers folder: its ``config.json`` and a name -> shard table."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"{self.folder} is not a folder")
        self.config: dict[str, Any] = read_json(self.folder / "config.json", "model config")
        if not isinstance(self.config, dict):
            raise FormatError(f"{self.folder / 'config.json'}: expected a JSON object")
        self.shards = self._shards()
        self.where: dict[str, Path] = {}
        self.headers: dict[str, dict[str, Any]] = {}
        for shard in self.shards:
            for name, info in read_safetensors_header(shard).items():
                if name in self.where:
                    raise FormatError(f"{self.folder}: tensor `{name}` is in both {self.where[name].name} and {shard.name}")
                self.where[name], self.headers[name] = shard, info
        self._open: dict[Path, Any] = {}

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            data = read_json(index, "safetensors index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise FormatError(f"{index}: no `weight_map` object")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise FormatError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
            return [self.folder / f for f in files]
        if (self.folder / SINGLE).is_file():
            return [self.folder / SINGLE]
        found = sorted(self.folder.glob("*.safetensors"))
        if found:
            return found
        bins = sorted(self.folder.glob("*.bin"))
        hint = " (only PyTorch .bin weights: convert them to safetensors)" if bins else ""
        raise FormatError(f"{self.folder}: no {SINGLE}, {INDEX} or *.safetensors weights{hint}")

    @property
    def file_size(self) -> int:
        return sum(p.stat().st_size for p in self.shards)

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self.headers[name]["dtype"]

    def tensor(self, name: str, raw: bool = False) -> torch.Tensor:
        """A float tensor; ``raw=True`` any dtype (GPTQ / bitsandbytes integer tensors)."""
        from safetensors import safe_open

        shard = self.where.get(name)
        if shard is None:
            raise FormatError(f"{self.folder}: tensor `{name}` is missing")
        if not raw and self.headers[name]["dtype"] not in _TORCH_DTYPES:
            raise FormatError(f"{shard}: tensor `{name}` has dtype {self.headers[name]['dtype']}; "
                              f"expected one of {', '.join(_TORCH_DTYPES)}")
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = safe_open(str(shard), framework="pt")
        return f.get_tensor(name)

    def type_counts(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for info in self.headers.values():
            n, b = out.get(info["dtype"], (0, 0))
            start, end = info["data_offsets"]
            out[info["dtype"]] = (n + 1, b + end - start)
        return out


class HFSource:
    """Tensors of an :class:`HFCheckpoint` as qadapt layers (the builder's ``TensorSource``).

    Linears are dense in ``dtype``; with ``quant`` (a GGUF type name) each one is quantized
    with gguf-py and becomes the layer ``make_linear`` builds for that type in ``mode``.
    """

    fmt = "hf"

    def __init__(self, ckpt: HFCheckpoint, mode: str, dtype: torch.dtype, quant: str | None = None,
                 reader=None, kernels: str = "exact"):
        self.ckpt, self.mode, self.dtype, self.quant, self.kernels = ckpt, mode, dtype, quant, kernels
        self.reader = reader  # GPTQ / bitsandbytes linears (qadapt.formats.quantized), asked first
        self.quantized: dict[str, tuple[int, int]] = {}  # type -> (layers, bytes)

    def has(self, name: str) -> bool:
        return self.ckpt.has(name) or (self.reader is not None and self.reader.has(name))

    def _matrix(self, name: str, shape: tuple[int, int], transposed: bool) -> torch.Tensor:
        w = self.ckpt.tensor(name)
        if transposed:  # Conv1D stores [in, out]
            w = w.T
        if tuple(w.shape) != tuple(shape):
            stored = list(self.ckpt.shape(name))
            raise FormatError(f"{self.ckpt.where[name]}: tensor `{name}` has shape {stored}, the config implies "
                              f"{list(shape[::-1]) if transposed else list(shape)}")
        return w

    def linear(self, name, shape, row_perm=None, transposed=False, quantize=True):
        from ..quant.base import DenseLinear
        from ..quant.ggml import make_linear

        layer = self.reader.linear(name, shape, transposed) if self.reader is not None else None
        if layer is not None:
            return layer
        w = self._matrix(name, shape, transposed)
        bname = name.removesuffix(".weight") + ".bias"
        bias = self.vector(bname) if self.has(bname) else None
        if bias is not None and bias.numel() != shape[0]:
            raise FormatError(f"{self.ckpt.where[bname]}: `{bname}` has {bias.numel()} values, expected {shape[0]}")
        if self.quant is None or not quantize:
            return DenseLinear(w.to(self.dtype).contiguous(), bias, qtype=self.ckpt.dtype_name(name))
        from ..quantize import quantize_weight

        raw, qtype = quantize_weight(w, self.quant, name)
        n, b = self.quantized.get(qtype, (0, 0))
        self.quantized[qtype] = (n + 1, b + raw.nbytes)
        return make_linear(raw, qtype, shape, bias=bias, mode=self.mode, dtype=self.dtype, kernels=self.kernels)

    def vector(self, name):
        return self.ckpt.tensor(name).float().reshape(-1)

    def embedding(self, name, shape):
        from ..quant.ggml import DenseEmbedding

        w = self._matrix(name, shape, False)
        return DenseEmbedding(w.to(self.dtype).contiguous(), qtype=self.ckpt.dtype_name(name))

