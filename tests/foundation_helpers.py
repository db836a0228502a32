"""Tiny random transformers models and PEFT adapters for the ordering / check / PEFT-format tests.

PEFT and transformers are the references here: the models are built from
configs only (a few KB of weights), so the tests stay fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ORDERINGS = SHARED / "conformance" / "orderings"

TINY = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=12),
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=12),
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=12),
}
ALL_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"],
    "gpt2": ["c_attn", "c_proj", "c_fc", "lm_head"],
}
for _arch in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
    ALL_TARGETS[_arch] = ALL_TARGETS["llama"]


def orderings_dir() -> Path:
    if not ORDERINGS.is_dir():
        pytest.skip(f"conformance orderings not found at {ORDERINGS} (the shared/ folder beside the checkout)")
    return ORDERINGS


def tiny_model(arch: str, **overrides):
    """A random ``AutoModelForCausalLM`` of ``arch`` with tiny sizes (seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **{**TINY, **TINY_CONFIGS[arch], **overrides})
    return AutoModelForCausalLM.from_config(cfg)


def save_config(model, folder: Path) -> Path:
    """Only ``config.json``: all that qadapt's weightless side reads."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    return folder


def peft_wrapped(model, **lora_kwargs) -> dict[str, object]:
    """PEFT's own enumeration: module path (no ``base_model.model.``) -> its LoRA layer, in order."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    pm = get_peft_model(model, LoraConfig(**lora_kwargs))
    return {
        name.removeprefix("base_model.model."): mod
        for name, mod in pm.named_modules()
        if isinstance(mod, LoraLayer)
    }


def make_adapter(folder: Path, arch: str = "llama", model_overrides=None, safe: bool = True, **lora_kwargs) -> Path:
    """A PEFT adapter saved with ``save_pretrained`` (random non-zero B so shapes and values are real)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, **(model_overrides or {}))
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.normal_()
    pm.save_pretrained(folder, safe_serialization=safe)
    return folder
