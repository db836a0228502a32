"""The configurations of real checkpoints, shrunk: every field of their config.json kept, sizes made small.

Sizes shrink to hidden 64 (4 heads), 2 layers, intermediate 128, a 320-token vocabulary (and the token
ids in range); an explicit head_dim stays different from hidden / heads. Context lengths shrink only where
the behaviour depends on a sequence passing them (LongRoPE's original context, dynamic NTK's maximum,
a sliding window), so that 40-token test sequences cross them; everything else (rope types, factors,
thetas, biases, tied embeddings, partial rotary factors) is the checkpoint's own.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

VOCAB = 320
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=VOCAB)

REAL = {
    # meta-llama/Llama-3.1-8B-Instruct: rope_type llama3
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": [2, 3, 4], "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 131072,
        "mlp_bias": False, "model_type": "llama", "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True},
    # meta-llama/Llama-3.2-1B: llama3 factor 32, tied embeddings, explicit head_dim
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True},
    # lmsys/vicuna-7b-v1.5-16k: linear scaling
    "vicuna-7b-16k": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 4.0, "type": "linear"},
        "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True},
    # a Llama with dynamic NTK scaling (max_position_embeddings shrunk from 4096 so that 40 tokens pass it)
    "llama-dynamic-ntk": {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 24, "model_type": "llama", "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 10000.0, "tie_word_embeddings": False},
    # Qwen/Qwen2.5-7B-Instruct with its README's YaRN long-context setting; qkv biases
    "qwen2.5-7b-yarn": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768, "max_window_layers": 28,
        "model_type": "qwen2", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}},
    # Qwen/Qwen2.5-0.5B-Instruct: tied embeddings, qkv biases
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768, "max_window_layers": 21,
        "model_type": "qwen2", "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False},
    # mistralai/Mistral-Nemo-Instruct-2407: head_dim 128 with hidden 5120 / 32 heads (160)
    "mistral-nemo": {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "head_dim": 32, "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 1024000,
        "model_type": "mistral", "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True},
    # mistralai/Mistral-7B-v0.1: a sliding window on every layer (4096, shrunk to 8)
    "mistral-7b-v0.1": {
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 32768, "model_type": "mistral", "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 8, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True},
    # Qwen/Qwen3-8B: per-head q/k RMSNorm, explicit head_dim (128 with hidden 4096 / 32 heads), no biases
    "qwen3-8b": {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "head_dim": 24, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3", "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False},
    # google/gemma-2-2b-it: soft-capped scores and logits, alternating sliding windows (4096, shrunk to 4),
    # query_pre_attn_scalar = head_dim (256, shrunk with it), tied embeddings
    "gemma-2-2b": {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
        "final_logit_softcapping": 30.0, "head_dim": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "initializer_range": 0.02, "max_position_embeddings": 8192,
        "model_type": "gemma2", "pad_token_id": 0, "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0, "sliding_window": 4, "torch_dtype": "float32", "use_cache": True},
    # google/gemma-3-1b-it: per-head q/k norms, five local layers (window 512 shrunk to 4, rotary base 10000)
    # to one global (base 1e6); the vocabulary is the converter's tokenizer's (it drops rows past it)
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
        "final_logit_softcapping": None, "head_dim": 24, "hidden_activation": "gelu_pytorch_tanh",
        "initializer_range": 0.02, "max_position_embeddings": 32768, "model_type": "gemma3_text",
        "num_hidden_layers": 6, "pad_token_id": 0, "query_pre_attn_scalar": 24, "rms_norm_eps": 1e-06,
        "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 4,
        "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 300},
    # microsoft/Phi-4-mini-instruct: partial_rotary_factor 0.75, LongRoPE (original 4096 shrunk to 16), tied
    "phi-4-mini": {
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
        "embd_pdrop": 0.0, "eos_token_id": 2, "full_attn_mod": 1, "hidden_act": "silu", "initializer_range": 0.02,
        "interpolate_factor": 1, "lm_head_bias": False, "max_position_embeddings": 64, "mlp_bias": False,
        "model_type": "phi3", "original_max_position_embeddings": 16, "pad_token_id": 2, "partial_rotary_factor": 0.75,
        "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": [1.0, 1.12, 1.6, 3.1, 7.9, 21.0], "short_factor": [1.0, 1.0, 1.01, 1.03, 1.1,
                                                                                             1.4], "type": "longrope"},
        "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True},
}

# mistralai/Mixtral-8x7B-v0.1: eight experts per layer, two per token (renormalised); GGUF: arch `llama`
REAL["mixtral-8x7b"] = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_experts_per_tok": 2, "num_local_experts": 8, "output_router_logits": False, "rms_norm_eps": 1e-05,
    "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True}
# Qwen/Qwen3-30B-A3B: 128 experts of width 768, 8 per token (shrunk to 16 of width 32, 4 per token),
# norm_topk_prob, Qwen3's per-head q/k norms
REAL["qwen3-30b-a3b"] = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "decoder_sparse_step": 1, "eos_token_id": 2, "head_dim": 24, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 32, "norm_topk_prob": True, "num_experts": 16, "num_experts_per_tok": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False}
# google/gemma-3-4b-it's text model: Gemma 3 1B's fields with linear rope scaling (factor 8) on the global layers
REAL["gemma-3-4b-text"] = {**REAL["gemma-3-1b"], "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
# Qwen/Qwen3-0.6B: Qwen3-8B's fields with tied embeddings and head_dim 128 over hidden 1024 / 16 heads (64)
REAL["qwen3-0.6b"] = {**REAL["qwen3-8b"], "head_dim": 32, "max_window_layers": 28, "tie_word_embeddings": True}


def config(name: str, **sizes) -> dict:
    """The shrunk config.json dict of checkpoint ``name`` (``sizes`` override the default small sizes; a real
    config's own layer count or vocabulary, where the test needs it, stays)."""
    cfg = copy.deepcopy(REAL[name])
    cfg.update({k: v for k, v in SIZES.items() if k not in ("num_hidden_layers", "vocab_size") or k not in cfg})
    cfg.update(sizes)
    return cfg


def build(name: str, seed: int = 0, **sizes):
    """(config.json dict, random transformers model of it, float32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = config(name, **sizes)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in copy.deepcopy(cfg).items() if k != "architectures"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong one shows
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return cfg, model


def save(model, cfg: dict, folder: Path, real_config_json: bool = True) -> Path:
    """``save_pretrained`` (safetensors); with ``real_config_json`` the config.json is the checkpoint's own
    layout (``rope_scaling`` / ``rope_theta``) rather than what transformers 5 writes (``rope_parameters``)."""
    model.save_pretrained(folder)
    if real_config_json:
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def sentencepiece_model() -> bytes:
    """A tiny SentencePiece BPE model with byte fallback (vocabulary 300 <= VOCAB), trained offline, seeded."""
    import sentencepiece as spm

    words = ["the", "cat", "sat", "on", "a", "mat", "hello", "world", "adapter", "model", "quant", "lora", "Paris",
             "capital", "France", "is", "of"]
    r = random.Random(0)
    sentences = [" ".join(r.choice(words) for _ in range(10)) for _ in range(400)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=out, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2, num_threads=1)
    return out.getvalue()


#: model types whose converter reads only a transformers BPE tokenizer (tokenizer.json), not tokenizer.model
BPE_ONLY = ("qwen3_moe",)


def convert(root: Path, jobs: list[tuple[Path, Path, str]]) -> None:
    """llama.cpp's convert_hf_to_gguf.py (with the sdist's gguf-py) on each (folder, out file, outtype), in one
    process. Each folder gets the tiny SentencePiece tokenizer.model the converter reads."""
    from models import save_tokenizer

    model = sentencepiece_model()
    for folder, _, _ in jobs:
        (folder / "tokenizer.model").write_bytes(model)
        if json.loads((folder / "config.json").read_text())["model_type"] in BPE_ONLY:
            save_tokenizer(folder)
    # the converter names a BPE tokenizer's pre-tokenizer by hashing what it makes of a test text, and knows only
    # real tokenizers' hashes: the tiny one is declared `qwen2` (the tokenizer is not what these tests compare)
    driver = ("import runpy, sys\n"
              "import conversion.base\n"
              "conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
              f"for args in {[[str(f), '--outfile', str(o), '--outtype', t] for f, o, t in jobs]!r}:\n"
              "    sys.argv = ['convert_hf_to_gguf.py', *args]\n"
              "    runpy.run_path('convert_hf_to_gguf.py', run_name='__main__')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "gguf-py"), str(root)]))
    r = subprocess.run([sys.executable, "-c", driver], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-4000:]}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama.cpp's converter q/k row order (FIELD-NOTES: reshape(n_head, 2, rows // n_head // 2)
    .swapaxes(1, 2))."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_model(model, gguf_path: Path, arch: str):
    """``model`` (transformers) with every weight replaced by gguf-py's dequantization of the GGUF tensor that
    gguf-py's name map gives for it; llama.cpp's q/k row permutation undone for the llama family. Only gguf-py
    and transformers are involved: the reference for logits of a converter-written file (Gemma's norms, which
    the converter stores as 1 + w, given back to transformers as w).

    A sliding window the file does not carry is dropped from the reference: llama.cpp's converter writes none
    for Mistral 7B v0.1 (llama.cpp runs it with full attention), so full attention is what the file describes."""
    import gguf

    ref = copy.deepcopy(model)
    reader = gguf.GGUFReader(gguf_path)
    if getattr(ref.config, "sliding_window", None) and not any(k.endswith(".attention.sliding_window") and
                                                               int(f.contents()) for k, f in reader.fields.items()):
        ref.config.sliding_window = None
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], ref.config.num_hidden_layers)
    permute = arch == "LLAMA"
    c = ref.config

    def deq(name):
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)

    with torch.no_grad():
        for key, p in ref.state_dict().items():
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # transformers 5's merged experts
                blk = f"blk.{key.split('.')[2]}"
                w = (np.concatenate([deq(f"{blk}.ffn_gate_exps.weight"), deq(f"{blk}.ffn_up_exps.weight")], 1)
                     if key.endswith("gate_up_proj") else deq(f"{blk}.ffn_down_exps.weight"))
                p.copy_(torch.from_numpy(np.ascontiguousarray(w.reshape(p.shape))))
                continue
            g = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if g not in tensors:
                if key == "lm_head.weight" and "output.weight" not in tensors:
                    g = "token_embd.weight"  # tied: the converter writes the table once
                else:
                    raise KeyError(f"{gguf_path.name}: no tensor for {key} ({g})")
            t = tensors[g]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape).astype(np.float32)
            if permute and key.endswith(("q_proj.weight", "k_proj.weight")):
                w = _unpermute(w, c.num_attention_heads if "q_proj" in key else c.num_key_value_heads)
            if arch.startswith("GEMMA") and key.endswith("norm.weight"):
                w = w - 1  # the converter stores Gemma's 1 + w; transformers adds the 1 itself
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return ref
