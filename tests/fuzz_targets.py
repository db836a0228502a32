"""The parsers under fuzzing, each called as a user's input would reach it.

Shared by tests/test_fuzz.py (bounded, in CI) and tools/fuzz.py (the long run).
A target returns normally or raises QadaptError; anything else is a finding.
"""

from __future__ import annotations

from pathlib import Path

from qadapt.errors import QadaptError


def _gguf(path: Path) -> None:
    from qadapt.formats.gguf import GGUFFile
    from qadapt.layer_maps import get_layer_map
    from qadapt.models.config import config_from_gguf

    gf = GGUFFile(path)
    config_from_gguf(gf, get_layer_map(gf.architecture))


def _safetensors(path: Path) -> None:
    from qadapt.io import read_safetensors_header

    read_safetensors_header(path)


def _ordering(path: Path) -> None:
    from qadapt.ordering import read_ordering

    read_ordering(path, log_warnings=False)


def _adapter_config(folder: Path) -> None:
    from qadapt.adapters.peft_format import read_adapter_config

    cfg = read_adapter_config(folder)
    cfg.unsupported_features()
    for p in ("model.layers.0.self_attn.q_proj", "lm_head"):
        cfg.matches(p)
        cfg.scale(p)


def _xlora_config(folder: Path) -> None:
    from qadapt.adapters.xlora_checkpoint import read_xlora

    read_xlora(folder)


def _gptq_config(folder: Path) -> None:
    import json

    from qadapt.formats.gptq import read_gptq_config

    cfg_json = folder / "config.json"
    cfg = read_gptq_config(folder, json.loads(cfg_json.read_text()) if cfg_json.is_file() else {})
    if cfg is not None:
        for p in ("model.layers.0.self_attn.q_proj", "lm_head"):
            cfg.for_module(p)
        cfg.describe()


TARGETS = {"gguf": _gguf, "safetensors": _safetensors, "ordering": _ordering, "adapter_config": _adapter_config,
           "xlora_config": _xlora_config, "gptq_config": _gptq_config}


def seed_gguf(path: Path) -> Path:
    """A small valid GGUF to mutate: a 1-block Llama (hidden 32, vocab 40) in Q8_0, metadata of every
    value type (strings, ints, floats, bools, arrays of strings and numbers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qadapt.models.gguf_export import export_gguf
    from qadapt.layer_maps import get_layer_map

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, vocab_size=40, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)] + [f"t{i}" for i in range(11)]
    tok = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.scores": [float(-i) for i in range(40)], "tokenizer.ggml.token_type": [1] * 40,
           "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": True, "general.name": "seed"}
    return export_gguf(model.state_dict(), cfg.to_dict(), get_layer_map("llama"), path, "Q8_0", tokenizer=tok,
                       force=True)


def run_one(name: str, arg) -> str | None:
    """None when the target behaved; else a description of the finding."""
    try:
        TARGETS[name](arg)
    except QadaptError:
        pass
    except Exception as e:  # noqa: BLE001 - a finding
        return f"{type(e).__name__}: {e}"
    return None
