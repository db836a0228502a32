"""Small random models for tests: transformers configs with random weights, written to GGUF.

The GGUF files are written by gguf-py's writer and quantizer (through
``qadapt.models.gguf_export``); the references the tests compare against are
transformers' modeling code and gguf-py's dequantization, never qadapt itself.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


@functools.lru_cache(maxsize=None)
def tiny_bpe() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (GPT-2 style) trained offline on a generated corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    words = ["the", "cat", "sat", "on", "a", "mat", "hello", "world", "adapter", "model", "quant", "lora"]
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, 12)) + "." for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    import json

    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


def tokenizer_metadata(vocab_size: int) -> dict:
    tokens, merges = tiny_bpe()
    tokens = tokens + [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    types = [3 if t.startswith("<") and t.endswith(">") and len(t) > 2 else 1 for t in tokens]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # byte-level BPE with GPT-2's split regex (tiny_bpe's)
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


#: a ChatML chat template for the tiny models (which, like many base models, carry none)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml_file(folder: Path) -> Path:
    path = folder / "chatml.jinja"
    path.write_text(CHATML)
    return path


def int4_logit_tol(scale: float, layers: int = 2, linears_per_layer: int = 7) -> float:
    """The logits tolerance of a model whose linears run torch's int4 kernel (Q4_0 / Q4_1 / Q4_K in place with
    the exact kernels, 4-bit GPTQ): that kernel rounds its input, scales and output to bfloat16 (unit roundoff
    2^-8), so each of the model's int4 matmuls moves its output by at most ~2^-8 of its scale; added up over the
    layers' linears and the head, the bound on the logits is n * 2^-8 of their scale (measured: ~1.4%, within it
    for the 2-layer test models' 15 matmuls: 5.9%)."""
    return (layers * linears_per_layer + 1) * 2 ** -8 * scale + 1e-4


def tiny_hf(arch: str = "llama", seed: int = 0, **overrides):
    """A random transformers causal LM of the given model_type, float32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = len(tiny_bpe()[0]) + 8
    kw = dict(TINY, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=0,
              tie_word_embeddings=False)
    if arch == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=vocab, bos_token_id=1,
                  eos_token_id=0, tie_word_embeddings=True)
    kw.update(overrides)
    cfg = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms away from 1 so that a wrong norm weight shows
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def write_gguf(model, path: Path, qtype: str = "F32") -> Path:
    from qadapt.models.gguf_export import export_gguf
    from qadapt.layer_maps import get_layer_map

    cfg = model.config.to_dict()
    lm = get_layer_map(cfg["model_type"])
    return export_gguf(model.state_dict(), cfg, lm, path, qtype, tokenizer=tokenizer_metadata(model.config.vocab_size),
                       force=True)


# byte offsets of the fp16 scale(s) inside one block, per type: randomised bytes elsewhere
_SCALE_OFFSETS = {
    "Q8_0": (0,), "Q4_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid blocks of a type gguf-py cannot quantize: random bytes with small fp16 (super-)block scales."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if cols % block:
        raise ValueError(f"{qtype} needs rows of whole {block}-element blocks, got {cols} columns")
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _SCALE_OFFSETS[qtype]:
        scale = rng.uniform(1e-4, 1e-3, size=(rows, cols // block)).astype(np.float16)
        data[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, cols // block * size)


def dequantized_reference(model, qtype: str, seed: int = 0):
    """(raw GGUF tensors, transformers model whose weights are gguf-py's dequantization of them).

    For types gguf-py quantizes, the reference is ``dequantize(quantize(W))``; for the others the
    file holds random valid blocks and the reference weights are their gguf-py dequantization,
    with llama.cpp's q/k row permutation undone (rows are independent, so this is exact).
    """
    import copy

    import gguf

    from qadapt.models.gguf_export import llama_cpp_permute
    from qadapt.quantize import QUANTIZABLE
    from qadapt.layer_maps import evaluate, get_layer_map

    ref = copy.deepcopy(model)
    lm = get_layer_map(model.config.model_type)
    shapes = lm.normalise_hf_config(model.config.to_dict())
    raw = {}
    rng = np.random.default_rng(seed)
    t = gguf.GGMLQuantizationType[qtype]
    sd = ref.state_dict()
    with torch.no_grad():
        if qtype in QUANTIZABLE:  # the exporter quantizes every matrix (embeddings too) but positions
            conv1d = {ls.module_path(i) + ".weight" for ls in lm.layers if ls.conv1d
                      for i in range(shapes["num_hidden_layers"])}  # written transposed: [out, in] blocks
            for key, v in sd.items():
                w = v.numpy().astype(np.float32)
                w = w.T.copy() if key in conv1d else w
                if v.ndim == 2 and key.endswith(".weight") and "wpe" not in key and w.shape[-1] % 32 == 0:
                    deq = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
                    v.copy_(torch.from_numpy(deq.T.copy() if key in conv1d else deq))
            return raw, ref
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        for ls in lm.layers:
            if ls.tied_to and tied:  # a tied head stays the (F32) token table, as in the file
                continue
            for i in range(shapes["num_hidden_layers"]) if ls.per_block else [None]:
                key = ls.module_path(i) + ".weight"
                if key not in sd:
                    continue
                w = sd[key].numpy()
                if ls.conv1d:
                    w = w.T
                blocks = random_blocks(qtype, *w.shape, rng)
                deq = gguf.quants.dequantize(blocks, t)
                n = evaluate(ls.gguf_permute_heads, shapes) if ls.gguf_permute_heads else None
                raw[ls.gguf_name(i) + ".weight"] = (llama_cpp_permute(blocks, n) if n else blocks, qtype)
                deq = torch.from_numpy(np.ascontiguousarray(deq.T if ls.conv1d else deq)).float()
                sd[key].copy_(deq)
    return raw, ref


def write_quantized(model, path: Path, qtype: str, seed: int = 0):
    """Write ``model`` as a GGUF of ``qtype`` and return the transformers reference for it."""
    from qadapt.models.gguf_export import export_gguf
    from qadapt.quantize import QUANTIZABLE
    from qadapt.layer_maps import get_layer_map

    raw, ref = dequantized_reference(model, qtype, seed)
    cfg = model.config.to_dict()
    export_gguf(model.state_dict(), cfg, get_layer_map(cfg["model_type"]), path,
                qtype if qtype in QUANTIZABLE else "F32", tokenizer=tokenizer_metadata(model.config.vocab_size),
                force=True, raw=raw)
    return ref


# ---------------------------------------------------------------------------------------- issue 5 helpers
def phi3_longrope(head_dim: int, original: int = 8, context: int = 64, window: int | None = 5) -> dict:
    """tiny_hf overrides for a long-context Phi-3: LongRoPE short/long factors with an original context
    shorter than the test sequences (so both factor sets are exercised), and a sliding window."""
    half = head_dim // 2
    return dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0 + 0.1 * i for i in range(half)],
                                  long_factor=[2.0 + 0.3 * i for i in range(half)]),
                original_max_position_embeddings=original, max_position_embeddings=context, sliding_window=window)


def tiny_arch(arch: str, seed: int = 0, wide: bool = False):
    """tiny_hf per family for the architecture tests; ``wide`` rows hold whole 256-value K-quant blocks."""
    kw: dict = {}
    if wide:
        kw = dict(n_embd=256) if arch == "gpt2" else dict(hidden_size=256, intermediate_size=512)
    if arch == "mistral":
        kw["sliding_window"] = 6
    if arch == "phi3":
        kw.update(phi3_longrope((256 if wide else 64) // 4))
    if arch in ("qwen3", "gemma2", "gemma3_text"):
        kw["head_dim"] = 24 if not wide else 128  # explicit, not hidden / heads (as these checkpoints)
    if arch.startswith("gemma"):  # llama.cpp scales queries by 1/sqrt(head_dim): the checkpoints' own choice
        kw.update(query_pre_attn_scalar=kw["head_dim"], sliding_window=6)
    if arch == "gemma3_text":
        kw["num_hidden_layers"] = 6  # five sliding layers, then a global one (GGUF carries no other pattern)
    return tiny_hf(arch, seed=seed, **kw)


def save_hf(model, folder: Path, shard: bool = False) -> Path:
    """``save_pretrained`` (safetensors), sharded into several files when ``shard``, plus a tokenizer."""
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    save_tokenizer(folder)
    return folder


def save_tokenizer(folder: Path) -> None:
    """The tiny byte-level BPE as a transformers fast tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = tiny_bpe()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")
    fast.save_pretrained(folder)


def qwen1_checkpoint(seed: int = 0, hidden: int = 64, heads: int = 4, ff: int = 128, layers: int = 2):
    """(config.json dict, state dict) of a random Qwen-1 model (QWenLMHeadModel names; transformers has
    no implementation, so these are written by hand from the remote code's module layout)."""
    vocab = len(tiny_bpe()[0]) + 8
    cfg = dict(model_type="qwen", architectures=["QWenLMHeadModel"], hidden_size=hidden, num_hidden_layers=layers,
               num_attention_heads=heads, kv_channels=hidden // heads, intermediate_size=2 * ff, vocab_size=vocab,
               layer_norm_epsilon=1e-6, rotary_emb_base=10000, rotary_pct=1.0, max_position_embeddings=256,
               seq_length=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=0)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": rnd(vocab, hidden, scale=0.5), "lm_head.weight": rnd(vocab, hidden, scale=0.2),
          "transformer.ln_f.weight": 1 + rnd(hidden, scale=0.1)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        sd.update({
            p + "ln_1.weight": 1 + rnd(hidden, scale=0.1), p + "ln_2.weight": 1 + rnd(hidden, scale=0.1),
            p + "attn.c_attn.weight": rnd(3 * hidden, hidden, scale=0.15), p + "attn.c_attn.bias": rnd(3 * hidden, scale=0.1),
            p + "attn.c_proj.weight": rnd(hidden, hidden, scale=0.15),
            p + "mlp.w1.weight": rnd(ff, hidden, scale=0.15), p + "mlp.w2.weight": rnd(ff, hidden, scale=0.15),
            p + "mlp.c_proj.weight": rnd(hidden, ff, scale=0.15),
        })
    return cfg, sd


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base, out: Path, seed: int, b_scale: float = 5, perturb: float = 0.0, **cfg) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved with save_pretrained (B scaled up by ``b_scale`` so
    that every adapter visibly moves the logits); ``cfg`` overrides LoraConfig's fields. ``perturb``: noise of
    that size added to what PEFT initialises as copies of the base (saved modules, trainable-token rows, DoRA
    magnitudes), so that those parts matter too."""
    import copy

    import peft

    torch.manual_seed(seed)
    kw = dict(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    kw.update(cfg)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(b_scale)
            if perturb and ("modules_to_save" in n or "trainable_tokens_delta" in n or "lora_magnitude" in n):
                p.add_(torch.randn_like(p) * perturb)
    pm.save_pretrained(out)
    return out


def peft_logits(ref, folders: dict, active, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's logits on ``ref`` with exactly the adapters ``active`` loaded and active (none: the base).

    Only those are loaded: PEFT keeps an inactive lm_head adapter's effect (FIELD-NOTES)."""
    import copy

    from peft import PeftModel

    names = list(active)
    if not names:
        with torch.no_grad():
            return ref(ids).logits
    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(folders[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(folders[n]), adapter_name=n)
    pm.base_model.set_adapter(names)
    pm.eval()
    with torch.no_grad():
        return pm(ids).logits
