"""Random GGUFs of real models' shapes, written fast: random block bytes with small scales, no quantizer run.

The bytes a real file of that type holds (every block valid), so speed and memory measured on them are a
real model's; used by ``qadapt bench --real-size`` and ``tools/gpu_check.py``.
"""

from __future__ import annotations

from pathlib import Path

# Llama 3 8B's configuration (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(name="llama3-8b", arch="llama", hidden=4096, layers=32, ff=14336, heads=32, kv_heads=8,
                 vocab=128256, rope_theta=500000.0)
# Qwen3 4B's (Qwen/Qwen3-4B config.json): head_dim 128 != hidden / heads, q/k norms, the output tied to the
# token embedding
QWEN3_4B = dict(name="qwen3-4b", arch="qwen3", hidden=2560, layers=36, ff=9728, heads=32, kv_heads=8, head_dim=128,
                vocab=151936, rope_theta=1000000.0, tied=True, eps=1e-6)
TINY = dict(name="tiny", arch="llama", hidden=256, layers=2, ff=512, heads=4, kv_heads=2, vocab=512,
            rope_theta=10000.0)
#: the real shapes, and tiny ones of the same architectures (tests)
SHAPES = {"llama3-8b": LLAMA3_8B, "qwen3-4b": QWEN3_4B, "tiny": TINY,
          "tiny-qwen3": dict(TINY, name="tiny-qwen3", arch="qwen3", head_dim=128, tied=True, eps=1e-6)}
#: llama.cpp's Q4_K_M recipe, simplified: attn_v, ffn_down and the output (a tied model's token embedding, which
#: serves as the output) in Q6_K, the rest Q4_K
MIXES = {"Q4_0": {}, "Q8_0": {}, "Q4_K_M": {"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K"}}
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}


def head_dim(shape: dict) -> int:
    return shape.get("head_dim") or shape["hidden"] // shape["heads"]


def hf_config(shape: dict) -> dict:
    """The transformers config.json fields of ``shape`` (for the layer maps: LoRA GGUFs, adapters)."""
    qwen = shape.get("arch") == "qwen3"
    cfg = {"architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"], "model_type": shape.get("arch", "llama"),
           "hidden_size": shape["hidden"], "num_hidden_layers": shape["layers"], "intermediate_size": shape["ff"],
           "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"], "head_dim": head_dim(shape),
           "vocab_size": shape["vocab"], "rope_theta": shape["rope_theta"], "rms_norm_eps": shape.get("eps", 1e-5),
           "max_position_embeddings": 8192, "tie_word_embeddings": shape.get("tied", False), "hidden_act": "silu"}
    return cfg


def write_model(path: Path, shape: dict, base_type: str) -> int:
    """A random GGUF of ``shape`` (types per :data:`MIXES`); returns the bytes one token's decode reads."""
    import numpy as np
    from gguf import GGUFWriter

    from ..io import atomic_path

    rng = np.random.default_rng(0)
    with atomic_path(path, force=True) as tmp:
        return _write_gguf(GGUFWriter(str(tmp), shape.get("arch", "llama")), rng, shape, base_type)


def _write_gguf(w, rng, shape, base_type) -> int:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .make import tokenizer_metadata
    from ..models.gguf_export import _add_kv

    h, f, L, v = shape["hidden"], shape["ff"], shape["layers"], shape["vocab"]
    hd = head_dim(shape)
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    tied = shape.get("tied", False)
    mix = MIXES[base_type]
    default = "Q4_K" if base_type == "Q4_K_M" else base_type
    w.add_context_length(8192)
    w.add_embedding_length(h)
    w.add_block_count(L)
    w.add_feed_forward_length(f)
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"])
    if "head_dim" in shape:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_layer_norm_rms_eps(shape.get("eps", 1e-5))
    w.add_rope_freq_base(shape["rope_theta"])
    for k, val in tokenizer_metadata(v).items():
        _add_kv(w, k, val)
    read = 0

    def quant(name: str, rows: int, cols: int, kind: str, reads: bool = True) -> None:
        nonlocal read
        qt = mix.get(kind, default)
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qt]]
        data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for off in SCALE_OFFSETS[qt]:
            data[:, :, off:off + 2] = rng.uniform(1e-4, 1e-3, (rows, cols // block)).astype(np.float16).view(
                np.uint8).reshape(rows, cols // block, 2)
        w.add_tensor(name, data.reshape(rows, -1), raw_dtype=GGMLQuantizationType[qt])
        if reads:
            read += data.nbytes

    def norm(name: str, n: int) -> None:
        nonlocal read
        w.add_tensor(name, np.ones(n, np.float32))
        read += 4 * n

    # a tied model's embedding is its output layer: every token reads it whole
    quant("token_embd.weight", v, h, "output" if tied else "token_embd", reads=tied)
    norm("output_norm.weight", h)
    if not tied:
        quant("output.weight", v, h, "output")
    for i in range(L):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", h)
        norm(p + "ffn_norm.weight", h)
        if shape.get("arch") == "qwen3":
            norm(p + "attn_q_norm.weight", hd)
            norm(p + "attn_k_norm.weight", hd)
        for name, rows, cols, kind in (("attn_q", q, h, "attn_q"), ("attn_k", kv, h, "attn_k"),
                                       ("attn_v", kv, h, "attn_v"), ("attn_output", h, q, "attn_output"),
                                       ("ffn_gate", f, h, "ffn_gate"), ("ffn_up", f, h, "ffn_up"),
                                       ("ffn_down", h, f, "ffn_down")):
            quant(p + name + ".weight", rows, cols, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return read


def write_adapter(folder: Path, shape: dict, seed: int, rank: int = 16, dtype=None) -> Path:
    """A PEFT LoRA folder (rank ``rank`` on q/k/v/o, random factors), its tensors stored in ``dtype``
    (float32 by default; bfloat16 as PEFT saves an adapter trained in bf16)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, hd = shape["hidden"], head_dim(shape)
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    sd = {}
    for i in range(shape["layers"]):
        for m, inp, out in (("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)):
            k = f"base_model.model.model.layers.{i}.self_attn.{m}"
            sd[k + ".lora_A.weight"] = (torch.randn(rank, inp, generator=g) * inp ** -0.5).contiguous()
            sd[k + ".lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01).contiguous()
    from ..io import atomic_path, write_json

    if dtype is not None:
        sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    with atomic_path(folder / "adapter_model.safetensors", force=True) as tmp:
        save_file(sd, str(tmp))
    write_json(folder / "adapter_config.json", dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), force=True)
    return folder
