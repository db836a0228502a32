"""Write a transformers checkpoint as a GGUF file, the way llama.cpp's converter lays it out.

Used to make test and demo models and for ``qadapt quantize``: names come from
the layer map and family spec, llama.cpp's q/k row permutation is applied for
the families that have it, and quantization is gguf-py's (the types it
implements: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import InputError
from ..layer_maps import LayerMap, evaluate
from .family import FAMILIES
from ..quantize import check_quant_type, fits_blocks, quantize_array

log = logging.getLogger(__name__)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter row order for q/k (see FIELD-NOTES)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize(w: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    import gguf

    check_quant_type(qtype)
    if qtype != "F32" and (w.ndim < 2 or not fits_blocks(w.shape[-1], qtype)):
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32  # vectors and odd rows stay F32
    return quantize_array(w, qtype), gguf.GGMLQuantizationType[qtype]


def export_gguf(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    layer_map: LayerMap,
    path: str | os.PathLike,
    qtype: str = "F32",
    *,
    tokenizer: Mapping[str, Any] | None = None,
    force: bool = False,
    keep_f32: tuple[str, ...] = (),
    raw: Mapping[str, tuple[np.ndarray, str]] | None = None,
) -> Path:
    """Write ``state_dict`` (transformers names) as GGUF. ``tokenizer`` holds ``tokenizer.ggml.*`` values.

    ``raw`` maps GGUF tensor names to already-encoded (bytes, type name) pairs, written as
    they are (how K-quant tensors, which gguf-py cannot quantize, get into a file).
    """
    import gguf

    from ..io import atomic_path
    from .config import config_from_hf

    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it")
    spec = FAMILIES[layer_map.architecture]
    cfg = config_from_hf(config, layer_map, str(path), spec.tie_embeddings_default)
    shapes = cfg.shapes
    arch = (layer_map.gguf_architectures or ("llama",))[0]
    sd = {k: v.detach().float().numpy() for k, v in state_dict.items()}

    tensors: list[tuple[str, np.ndarray]] = []
    for role, (hf, gg) in spec.tensors.items():
        per_block = "{i}" in hf
        for i in range(cfg.num_hidden_layers) if per_block else [None]:
            h = hf.format(i=i) if per_block else hf
            if h in sd:
                w = sd[h] + 1 if spec.gemma and "norm" in role else sd[h]  # as llama.cpp's converter stores them
                tensors.append((gg.format(i=i) if per_block else gg, w))
    keep_f32 = tuple(keep_f32)
    for ls in layer_map.layers:
        per_block = ls.per_block
        for i in range(cfg.num_hidden_layers) if per_block else [None]:
            if ls.per_expert:  # one merged [experts, out, in] tensor per projection, as llama.cpp's converter
                names = [ls.module_path(i, e) + ".weight" for e in range(cfg.num_experts)]
                if all(n in sd for n in names):
                    tensors.append((ls.gguf_name(i) + ".weight", np.stack([sd[n] for n in names])))
                continue
            if ls.role == "router":  # kept F32, as llama.cpp's converter and quantizer keep it
                keep_f32 += (ls.gguf_name(i) + ".weight",)
            src = ls.module_path(i)
            if src + ".weight" not in sd:
                continue
            w = sd[src + ".weight"]
            b = sd.get(src + ".bias")
            if ls.conv1d:
                w = w.T.copy()
            if ls.gguf_permute_heads:
                n = evaluate(ls.gguf_permute_heads, shapes)
                w = llama_cpp_permute(w, n)
                b = None if b is None else llama_cpp_permute(b, n)
            tensors.append((ls.gguf_name(i) + ".weight", w))
            if b is not None:
                tensors.append((ls.gguf_name(i) + ".bias", b))

    with atomic_path(path, force=force) as tmp:
        writer = gguf.GGUFWriter(path=tmp, arch=arch)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_context_length(cfg.rope.max_positions)  # the config's own; a scaling extends it on load
        writer.add_embedding_length(cfg.hidden_size)
        # the config's own value, as llama.cpp's converter writes it (Qwen-1's counts both MLP branches)
        writer.add_feed_forward_length(int(config.get("intermediate_size") or cfg.intermediate_size))
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        if spec.norm == "rms":
            writer.add_layer_norm_rms_eps(cfg.norm_eps)
        else:
            writer.add_layer_norm_eps(cfg.norm_eps)
        if spec.positions == "rope":
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.rope_dim or cfg.head_dim)
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        if cfg.sliding_window:
            writer.add_sliding_window(int(cfg.sliding_window))
        if cfg.num_experts:
            writer.add_expert_count(cfg.num_experts)
            writer.add_expert_used_count(cfg.num_experts_per_tok)
            if cfg.moe_intermediate_size:
                writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            if not cfg.norm_topk:
                raise InputError(f"{path}: routing weights that are not renormalised (`norm_topk_prob: false`) have "
                                 f"no GGUF form: llama.cpp renormalises a {arch} model's")
        if cfg.attn_softcap:
            writer.add_attn_logit_softcapping(float(cfg.attn_softcap))
        if cfg.final_softcap:
            writer.add_final_logit_softcapping(float(cfg.final_softcap))
        if spec.positions == "rope":
            tensors += _rope_scaling(writer, cfg.rope, path)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32) if qtype == "F32" else 1)
        for key, value in (tokenizer or {}).items():
            _add_kv(writer, key, value)
        for name, w in tensors:
            if raw and name in raw:
                data, tname = raw[name]
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType[tname])
                continue
            is_matrix = w.ndim in (2, 3) and name.endswith(".weight") and not name.startswith("position_embd")
            if is_matrix and name not in keep_f32:
                data, t = quantize(w, qtype)
            else:
                data, t = w.astype(np.float32), gguf.GGMLQuantizationType.F32
            writer.add_tensor(name, data, raw_shape=data.shape if data.dtype == np.uint8 else None, raw_dtype=t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _rope_scaling(writer, rope, path: Path) -> list[tuple[str, np.ndarray]]:
    """A rope scaling's keys and tensors, as llama.cpp's converter writes them."""
    import gguf

    from .rope import inv_freq, yarn_attention_factor

    if rope.kind == "longrope":  # as the Phi-3 converter: factor tensors, the original context, the scale
        writer.add_rope_scaling_orig_ctx_len(int(rope.original))
        writer.add_rope_scaling_attn_factors(float(rope.attention_factor))
        return [("rope_factors_long.weight", np.asarray(rope.long_factor, np.float32)),
                ("rope_factors_short.weight", np.asarray(rope.short_factor, np.float32))]
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    elif rope.kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.factor)
        writer.add_rope_scaling_orig_ctx_len(int(rope.original))
        if rope.attention_factor != yarn_attention_factor(rope.factor):
            writer.add_rope_scaling_yarn_attn_factor(rope.attention_factor)
        if (rope.beta_fast, rope.beta_slow) != (32.0, 1.0):
            writer.add_rope_scaling_yarn_beta_fast(rope.beta_fast)
            writer.add_rope_scaling_yarn_beta_slow(rope.beta_slow)
        if not rope.truncate:
            raise InputError(f"{path}: yarn without truncation (`truncate: false`) has no GGUF form")
    elif rope.kind == "llama3":  # per-frequency divisors in `rope_freqs`, as the Llama converter writes them
        from dataclasses import replace

        base, _ = inv_freq(replace(rope, kind="default"), 0)
        scaled, _ = inv_freq(rope, 0)
        return [("rope_freqs.weight", (base / scaled).numpy().astype(np.float32))]
    elif rope.kind == "dynamic":
        raise InputError(f"{path}: dynamic NTK rope scaling has no GGUF form (llama.cpp does not implement it)")
    return []


def _add_kv(writer, key: str, value: Any) -> None:
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:  # pragma: no cover
        raise TypeError(f"cannot write {key}={type(value).__name__} to GGUF")
    del gguf


def set_metadata(src: str | os.PathLike, dst: str | os.PathLike, changes: Mapping[str, Any], *,
                 force: bool = False) -> Path:
    """Copy a GGUF file with some metadata scalars set (str, bool, int, float) or removed (``None``).

    The tensor infos and data are copied byte for byte (the data section moves to the file's alignment);
    an int keeps the integer type the key already had (uint32 for a new key), a float is float32."""
    import mmap
    import struct

    from ..formats.gguf import read_header
    from ..io import atomic_path

    src = Path(src)
    with open(src, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        h = read_header(src, mm, len(mm))
        entries = {k: bytes(mm[a:b]) for k, (a, b) in h.kv_spans.items()}
        for key, value in changes.items():
            if value is None:
                entries.pop(key, None)
                continue
            kb = key.encode("utf-8")
            old_type = struct.unpack_from("<I", entries[key], 8 + len(kb))[0] if key in entries else None
            if isinstance(value, bool):
                body = struct.pack("<IB", 7, value)
            elif isinstance(value, int):
                ints = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 10: "Q", 11: "q"}
                tid = old_type if old_type in ints else 4
                body = struct.pack("<I" + ints[tid], tid, value)
            elif isinstance(value, float):
                body = struct.pack("<If", 6, value)
            elif isinstance(value, str):
                vb = value.encode("utf-8")
                body = struct.pack("<IQ", 8, len(vb)) + vb
            else:
                raise InputError(f"set_metadata: {key} = {type(value).__name__} is not a scalar GGUF value")
            entries[key] = struct.pack("<Q", len(kb)) + kb + body
        head = bytes(mm[:8]) + struct.pack("<QQ", len(h.infos), len(entries)) + b"".join(entries.values())
        head += bytes(mm[h.infos_span[0]:h.infos_span[1]])
        head += b"\0" * (-len(head) % h.alignment)
        with atomic_path(Path(dst), force=force) as tmp, open(tmp, "wb") as out:
            out.write(head)
            out.write(mm[h.data_start:])
    return Path(dst)
