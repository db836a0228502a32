"""Build the decoder from a tensor source (a GGUF file, or a transformers checkpoint: formats/hf.py).

The layer map says which linears exist, their shapes and names in each format;
the family spec names the few other tensors. A source only answers "give me the
tensor called X as a linear / vector / embedding", so adding a format never
touches the model code.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from torch import nn

from ..errors import FormatError
from ..layer_maps import LayerMap, evaluate
from ..progress import progress
from .config import ModelConfig
from .decoder import Block, Decoder, Rotary, make_norm
from .family import FamilySpec

log = logging.getLogger(__name__)


class TensorSource(Protocol):
    fmt: str  # "gguf" | "hf": which name column of the layer map / family spec applies

    def has(self, name: str) -> bool: ...

    def linear(self, name: str, shape: tuple[int, int], row_perm: torch.Tensor | None,
               transposed: bool = False, quantize: bool = True) -> nn.Module: ...

    def expert_linear(self, name: str, expert: int, n_experts: int, shape: tuple[int, int]) -> nn.Module: ...

    def vector(self, name: str) -> torch.Tensor: ...

    def embedding(self, name: str, shape: tuple[int, int]) -> nn.Module: ...


def llama_cpp_unpermute(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation.

    The converter stores ``w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)``;
    stored row ``i`` is original row ``perm[i]``, so original = stored[argsort(perm)].
    """
    perm = torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)
    return torch.argsort(perm)


class GGUFSource:
    """Tensors of a :class:`~qadapt.formats.gguf.GGUFFile`, as qadapt layers."""

    fmt = "gguf"

    def __init__(self, gf, mode: str, dtype: torch.dtype, kernels: str = "exact"):
        self.gf, self.mode, self.dtype, self.kernels = gf, mode, dtype, kernels

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def _bias(self, weight_name: str, out_features: int) -> torch.Tensor | None:
        name = weight_name.removesuffix(".weight") + ".bias"
        if name not in self.gf.tensors:
            return None
        b = self.vector(name)
        if b.numel() != out_features:
            raise FormatError(f"{self.gf.path}: `{name}` has {b.numel()} values, expected {out_features}")
        return b

    def _check(self, name: str, shape: tuple[int, ...]):
        t = self.gf.tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise FormatError(
                f"{self.gf.path}: tensor `{name}` has shape {list(t.shape)}, the metadata implies {list(shape)}"
            )
        return t

    def linear(self, name, shape, row_perm=None, transposed=False, quantize=True):
        from ..quant.ggml import make_linear

        t = self._check(name, shape)
        bias = self._bias(name, shape[0])
        if bias is not None and row_perm is not None:
            bias = bias[row_perm]
        # the rows are taken in the layer: by its repack, after the load, on the default kernels
        return make_linear(t.data, t.qtype, shape, bias=bias, mode=self.mode, dtype=self.dtype, kernels=self.kernels,
                           row_perm=row_perm)

    def expert_linear(self, name, expert, n_experts, shape):
        """Expert ``expert``'s [out, in] slice of a merged [experts, out, in] tensor (llama.cpp stores a layer's
        experts as one tensor per projection); the layer reads the file's bytes in place."""
        from ..quant.ggml import make_linear

        t = self._check(name, (n_experts, *shape))
        return make_linear(t.data[expert], t.qtype, shape, mode=self.mode, dtype=self.dtype, kernels=self.kernels)

    def vector(self, name):
        from ..quant.ggml import dequantize_array

        t = self.gf.tensor(name)
        # a copy, never a view of the mapping: reading a few KB there keeps 64 KiB resident (fault-around)
        return dequantize_array(t.data, t.qtype, t.shape).float().reshape(-1).clone()

    def embedding(self, name, shape):
        from ..quant.ggml import make_embedding

        t = self._check(name, shape)
        return make_embedding(t.data, t.qtype, shape, mode=self.mode, dtype=self.dtype)


class _Embedding(nn.Module):
    """Learned positions (GPT-2) are small: kept dense."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(table, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


def build_decoder(cfg: ModelConfig, layer_map: LayerMap, spec: FamilySpec, src: TensorSource,
                  desc: str = "loading") -> Decoder:
    shapes = cfg.shapes
    fmt = src.fmt

    def tname(role: str, i: int | None = None) -> str | None:
        return spec.tensor_name(role, fmt, i)

    def norm(role: str, i: int | None = None, width: int | None = None) -> nn.Module:
        w = src.vector(tname(role, i))
        want = width or cfg.hidden_size
        if w.numel() != want:
            raise FormatError(f"`{tname(role, i)}` has {w.numel()} values, expected {want} "
                              f"({'head_dim' if width else 'hidden size'})")
        bname = tname(role + "_bias", i)
        b = src.vector(bname) if bname and src.has(bname) else None
        if spec.gemma and fmt == "hf":  # transformers applies 1 + w (llama.cpp's converter stores w + 1)
            w = w.float() + 1
        return make_norm(spec, w, b, cfg.norm_eps)

    def linear(ls, i):
        in_f, out_f = ls.shape(shapes)
        if fmt == "gguf":  # llama.cpp's converter transposes Conv1D weights (GPT-2) to [out, in]
            perm = None
            if ls.gguf_permute_heads:
                perm = llama_cpp_unpermute(out_f, evaluate(ls.gguf_permute_heads, shapes))
            return src.linear(ls.gguf_name(i) + ".weight", (out_f, in_f), perm)
        # a router stays as stored (llama.cpp's quantizer leaves `ffn_gate_inp` alone: its top-k is fragile)
        return src.linear(ls.module_path(i) + ".weight", (out_f, in_f), None, transposed=ls.conv1d,
                          quantize=ls.role != "router")

    def expert(ls, i, e):
        in_f, out_f = ls.shape(shapes)
        if fmt == "gguf":
            return src.expert_linear(ls.gguf_name(i) + ".weight", e, cfg.num_experts, (out_f, in_f))
        return src.linear(ls.module_path(i, e) + ".weight", (out_f, in_f), None)

    block_specs = [ls for ls in layer_map.layers if ls.per_block and not ls.per_expert]
    expert_specs = [ls for ls in layer_map.layers if ls.per_expert]
    fused = {ls.role: ls for ls in block_specs if ls.role == "qkv"}
    qkv_split = tuple(evaluate(e, shapes) for e in fused["qkv"].fused) if fused else None
    blocks = []
    for i in progress(range(cfg.num_hidden_layers), desc=desc, unit="block"):
        linears = {ls.role: linear(ls, i) for ls in block_specs}
        qk = (norm("q_norm", i, cfg.head_dim), norm("k_norm", i, cfg.head_dim)) if spec.qk_norm else None
        post = (norm("post_attn_norm", i), norm("post_mlp_norm", i)) if "post_attn_norm" in spec.tensors else None
        experts = [{ls.role: expert(ls, i, e) for ls in expert_specs} for e in range(cfg.num_experts)]
        blocks.append(Block(cfg, spec, linears, norm("attn_norm", i), norm("mlp_norm", i), qkv_split, i, qk, post,
                            experts))

    embed_name = tname("embed")
    embed = src.embedding(embed_name, (cfg.vocab_size, cfg.hidden_size))
    head_spec = next(ls for ls in layer_map.layers if ls.role == "lm_head")
    head_name = (head_spec.gguf_name() if fmt == "gguf" else head_spec.module_path()) + ".weight"
    if src.has(head_name) and not (fmt == "hf" and cfg.tie_embeddings):
        lm_head = linear(head_spec, None)
    else:  # tied output head: the same bytes as the token table
        lm_head = src.linear(embed_name, (cfg.vocab_size, cfg.hidden_size), None)
    pos_embed = None
    if spec.positions == "learned":
        pos_embed = _Embedding(src.vector(tname("pos_embed")).reshape(-1, cfg.hidden_size))
    rope = Rotary(cfg.rope, min(cfg.context_length, 4096)) if spec.positions == "rope" else None
    return Decoder(cfg, spec, embed, blocks, norm("final_norm"), lm_head, rope, pos_embed)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the storage behind every parameter and buffer (quantized layers register theirs), each storage
    counted once (a tied head and its token table share one; a view shares its base's). Under the repack lock:
    a layer the background repack is swapping (file blocks -> 8-row layout) is counted before or after, once."""
    from ..quant import repack

    seen: set[int] = set()
    total = 0
    with repack.LOCK:
        tensors = list(model.parameters()) + list(model.buffers())
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total
