"""Random GPTQ checkpoints of real models' shapes (the transformers / GPTQModel folder layout), written fast.

Random 4-bit codes packed as GPTQ packs them, small fp16 scales, zero points 8 (stored as 7: checkpoint
format ``gptq``, v1), ``g_idx = i // group``; embeddings, norms and the output layer in fp16. The bytes a
real 4-bit GPTQ checkpoint of that shape holds, for speed and memory measurements (``tools/gpu_check.py``).
"""

from __future__ import annotations

from pathlib import Path

from .random_gguf import head_dim, hf_config


def write_gptq_model(folder: Path, shape: dict, bits: int = 4, group: int = 128, seed: int = 0) -> int:
    """``folder`` with config.json (its ``quantization_config``) and model.safetensors; returns the bytes one
    token's decode reads (every linear's packed codes, scales and zeros, the output layer, the norms)."""
    import torch
    from safetensors.torch import save_file

    from ..io import atomic_path, write_json

    if shape.get("arch", "llama") != "llama":
        raise ValueError(f"random GPTQ checkpoints are written with Llama's tensor names, not {shape['arch']}'s")
    if bits not in (2, 4, 8):
        raise ValueError(f"random GPTQ checkpoints are written with 2, 4 or 8 bits, not {bits}")
    g = torch.Generator().manual_seed(seed)
    h, f, L, v = shape["hidden"], shape["ff"], shape["layers"], shape["vocab"]
    hd = head_dim(shape)
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    per = 32 // bits
    sd: dict[str, torch.Tensor] = {}
    read = 0

    def linear(name: str, out: int, inp: int) -> None:
        nonlocal read
        groups = inp // group
        t = {"qweight": torch.randint(-2 ** 31, 2 ** 31, (inp // per, out), generator=g, dtype=torch.int64).to(torch.int32),
             "qzeros": torch.full((groups, out // per), sum((2 ** (bits - 1) - 1) << (bits * j) for j in range(per)),
                                  dtype=torch.int64).to(torch.int32),
             "scales": (torch.rand(groups, out, generator=g) * 1e-3 + 1e-4).half(),
             "g_idx": (torch.arange(inp) // group).to(torch.int32)}
        for k, x in t.items():
            sd[f"{name}.{k}"] = x
        read += sum(x.numel() * x.element_size() for k, x in t.items() if k != "g_idx")

    sd["model.embed_tokens.weight"] = (torch.randn(v, h, generator=g) * 0.02).half()
    sd["lm_head.weight"] = (torch.randn(v, h, generator=g) * 0.02).half()
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    read += v * h * 2
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for m, out, inp in (("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                            ("self_attn.o_proj", h, q), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h),
                            ("mlp.down_proj", h, f)):
            linear(p + m, out, inp)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors", force=True) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    cfg = hf_config(shape)
    cfg.update(torch_dtype="float16", bos_token_id=1, eos_token_id=0,
               quantization_config={"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                                    "sym": True, "checkpoint_format": "gptq", "pack_dtype": "int32",
                                    "lm_head": False})
    write_json(folder / "config.json", cfg, force=True)
    return read
