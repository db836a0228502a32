"""Random GGUFs of real models' shapes, written fast: random block bytes with small scales, no quantizer run.

The bytes a real file of that type holds (every block valid), so speed and memory measured on them are a
real model's; used by ``qadapt bench --real-size`` and ``tools/gpu_check.py``.
"""

from __future__ import annotations

from pathlib import Path

# Llama 3 8B's configuration (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(hidden=4096, layers=32, ff=14336, heads=32, kv_heads=8, vocab=128256, rope_theta=500000.0)
TINY = dict(hidden=256, layers=2, ff=512, heads=4, kv_heads=2, vocab=512, rope_theta=10000.0)
#: llama.cpp's Q4_K_M recipe, simplified: attn_v, ffn_down and the output in Q6_K, the rest Q4_K
MIXES = {"Q4_0": {}, "Q8_0": {}, "Q4_K_M": {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}}
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def write_model(path: Path, shape: dict, base_type: str) -> int:
    """A random GGUF of ``shape`` (types per :data:`MIXES`); returns the bytes one token's decode reads."""
    import numpy as np
    from gguf import GGUFWriter

    from ..io import atomic_path

    rng = np.random.default_rng(0)
    h, f, L, v = shape["hidden"], shape["ff"], shape["layers"], shape["vocab"]
    kv = h // shape["heads"] * shape["kv_heads"]
    mix = MIXES[base_type]
    default = "Q4_K" if base_type == "Q4_K_M" else base_type
    with atomic_path(path, force=True) as tmp:
        return _write_gguf(GGUFWriter(str(tmp), "llama"), rng, h, f, L, v, kv, shape, mix, default)


def _write_gguf(w, rng, h, f, L, v, kv, shape, mix, default) -> int:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .make import tokenizer_metadata
    from ..models.gguf_export import _add_kv

    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_block_count(L)
    w.add_feed_forward_length(f)
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(shape["rope_theta"])
    for k, val in tokenizer_metadata(v).items():
        _add_kv(w, k, val)
    read = 0

    def quant(name: str, rows: int, cols: int, kind: str) -> None:
        nonlocal read
        qt = mix.get(kind, default)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qt]]
        data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for off in SCALE_OFFSETS[qt]:
            data[:, :, off:off + 2] = rng.uniform(1e-4, 1e-3, (rows, cols // block)).astype(np.float16).view(
                np.uint8).reshape(rows, cols // block, 2)
        w.add_tensor(name, data.reshape(rows, -1), raw_dtype=GGMLQuantizationType[qt])
        if kind != "token_embd":
            read += data.nbytes

    quant("token_embd.weight", v, h, "token_embd")
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    quant("output.weight", v, h, "output")
    for i in range(L):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(h, np.float32))
        for name, rows, cols, kind in (("attn_q", h, h, "attn_q"), ("attn_k", kv, h, "attn_k"),
                                       ("attn_v", kv, h, "attn_v"), ("attn_output", h, h, "attn_output"),
                                       ("ffn_gate", f, h, "ffn_gate"), ("ffn_up", f, h, "ffn_up"),
                                       ("ffn_down", h, f, "ffn_down")):
            quant(p + name + ".weight", rows, cols, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read + 2 * h * 4 * L + h * 4  # + the norms


def write_adapter(folder: Path, shape: dict, seed: int, rank: int = 16) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h = shape["hidden"]
    kv = h // shape["heads"] * shape["kv_heads"]
    sd = {}
    for i in range(shape["layers"]):
        for m, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            k = f"base_model.model.model.layers.{i}.self_attn.{m}"
            sd[k + ".lora_A.weight"] = (torch.randn(rank, h, generator=g) * h ** -0.5).contiguous()
            sd[k + ".lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01).contiguous()
    from ..io import atomic_path, write_json

    with atomic_path(folder / "adapter_model.safetensors", force=True) as tmp:
        save_file(sd, str(tmp))
    write_json(folder / "adapter_config.json", dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), force=True)
    return folder
