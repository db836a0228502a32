"""Random quantized transformers checkpoints of real models' shapes (the folders GPTQModel and transformers
save), written fast: the bytes a real checkpoint of that shape holds, for speed and memory measurements
(``tools/gpu_check.py``), no quantization run.

One skeleton (embeddings, norms and the output layer in fp16, Llama's tensor names) and per format only its
linears and ``quantization_config``:

- GPTQ (:func:`write_gptq_model`): random 2/4/8-bit codes packed as GPTQ packs them, small fp16 scales, zero
  points 8 (stored as 7: checkpoint format ``gptq``, v1), ``g_idx = i // group``;
- bitsandbytes nf4 (:func:`write_nf4_model`): random packed 4-bit codes in bitsandbytes' layout, small float32
  absmax per 64 values (no double quantization), the nf4 code table and the quant state bitsandbytes reads
  back (needs bitsandbytes: its ``QuantState`` writes the state entries).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .random_gguf import head_dim, hf_config

NF4_BLOCKSIZE = 64


def _write(folder: Path, shape: dict, what: str, linear: Callable[[dict, str, int, int], int],
           quantization_config: dict[str, Any]) -> int:
    """The checkpoint, each linear's tensors from ``linear(state_dict, name, out, in)`` (which returns the bytes
    a decode step reads of them); returns the bytes one token's decode reads."""
    import torch
    from safetensors.torch import save_file

    from ..io import atomic_path, write_json

    if shape.get("arch", "llama") != "llama":
        raise ValueError(f"random {what} checkpoints are written with Llama's tensor names, not {shape['arch']}'s")
    h, f, L, v = shape["hidden"], shape["ff"], shape["layers"], shape["vocab"]
    hd = head_dim(shape)
    q, kv = shape["heads"] * hd, shape["kv_heads"] * hd
    g = torch.Generator().manual_seed(1)
    sd: dict[str, torch.Tensor] = {}
    sd["model.embed_tokens.weight"] = (torch.randn(v, h, generator=g) * 0.02).half()
    sd["lm_head.weight"] = (torch.randn(v, h, generator=g) * 0.02).half()
    sd["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    read = v * h * 2
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        for m, out, inp in (("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                            ("self_attn.o_proj", h, q), ("mlp.gate_proj", f, h), ("mlp.up_proj", f, h),
                            ("mlp.down_proj", h, f)):
            read += linear(sd, p + m, out, inp)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors", force=True) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    cfg = hf_config(shape)
    cfg.update(torch_dtype="float16", bos_token_id=1, eos_token_id=0, quantization_config=quantization_config)
    write_json(folder / "config.json", cfg, force=True)
    return read


def write_gptq_model(folder: Path, shape: dict, bits: int = 4, group: int = 128, seed: int = 0) -> int:
    """A GPTQ checkpoint in ``folder``; returns the bytes one token's decode reads (every linear's packed codes,
    scales and zeros, the output layer, the norms)."""
    import torch

    if bits not in (2, 4, 8):
        raise ValueError(f"random GPTQ checkpoints are written with 2, 4 or 8 bits, not {bits}")
    g = torch.Generator().manual_seed(seed)
    per = 32 // bits

    def linear(sd: dict, name: str, out: int, inp: int) -> int:
        groups = inp // group
        t = {"qweight": torch.randint(-2 ** 31, 2 ** 31, (inp // per, out), generator=g, dtype=torch.int64).to(torch.int32),
             "qzeros": torch.full((groups, out // per), sum((2 ** (bits - 1) - 1) << (bits * j) for j in range(per)),
                                  dtype=torch.int64).to(torch.int32),
             "scales": (torch.rand(groups, out, generator=g) * 1e-3 + 1e-4).half(),
             "g_idx": (torch.arange(inp) // group).to(torch.int32)}
        for k, x in t.items():
            sd[f"{name}.{k}"] = x
        return sum(x.numel() * x.element_size() for k, x in t.items() if k != "g_idx")

    return _write(folder, shape, "GPTQ", linear, {
        "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": True,
        "checkpoint_format": "gptq", "pack_dtype": "int32", "lm_head": False})


def write_nf4_model(folder: Path, shape: dict, seed: int = 0) -> int:
    """A bitsandbytes nf4 checkpoint in ``folder``; returns the bytes one token's decode reads (every linear's
    packed codes and absmax, the output layer, the norms)."""
    import torch
    from bitsandbytes.functional import QuantState, get_4bit_type

    g = torch.Generator().manual_seed(seed)
    code = get_4bit_type("nf4", device="cpu")

    def linear(sd: dict, name: str, out: int, inp: int) -> int:
        absmax = torch.rand(out * inp // NF4_BLOCKSIZE, generator=g) * 1e-2 + 1e-3
        sd[f"{name}.weight"] = torch.randint(0, 256, (out * inp // 2, 1), generator=g, dtype=torch.uint8)
        state = QuantState(absmax=absmax, shape=torch.Size([out, inp]), code=code.clone(), blocksize=NF4_BLOCKSIZE,
                           quant_type="nf4", dtype=torch.float16)
        for k, t in state.as_dict(packed=True).items():
            sd[f"{name}.weight.{k}"] = t
        return out * inp // 2 + absmax.numel() * 4

    return _write(folder, shape, "nf4", linear, {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": "float16"})
