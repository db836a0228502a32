"""Mixture-of-experts decode against its active-parameter bound (``qadapt bench --moe``).

A random Mixtral-shaped model (8 experts, 2 per token) is written as GGUF (gguf-py's Q8_0 or Q4_0, the merged
``ffn_*_exps`` tensors llama.cpp's converter writes) and decoded one token at a time by qadapt (the default,
``qadapt.load(path)``), with and without a LoRA on the attention and every expert, and by llama.cpp
(llama-cpp-python) where it is installed. The bound is the read bandwidth over the bytes one token must read:
every tensor except the token table (one row of it) and, of each merged expert tensor, only the routed
experts' share (k of n).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoeShape:
    hidden_size: int = 1024
    num_hidden_layers: int = 8
    intermediate_size: int = 1408
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 32000

    def hf_config(self) -> dict[str, Any]:
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **asdict(self),
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "hidden_act": "silu",
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 0}


QUICK_MOE = MoeShape(256, 2, 384, 8, 2, 8, 2, 4096)


def _state_dict(shape: MoeShape, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, e = shape.hidden_size, shape.intermediate_size, shape.num_local_experts
    kv = h // shape.num_attention_heads * shape.num_key_value_heads

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g) * cols ** -0.5

    sd = {"model.embed_tokens.weight": mat(shape.vocab_size, h), "lm_head.weight": mat(shape.vocab_size, h),
          "model.norm.weight": torch.ones(h)}
    for b in range(shape.num_hidden_layers):
        p = f"model.layers.{b}."
        sd.update({p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h),
                   p + "self_attn.q_proj.weight": mat(h, h), p + "self_attn.k_proj.weight": mat(kv, h),
                   p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, h),
                   p + "block_sparse_moe.gate.weight": mat(e, h)})
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            sd.update({q + "w1.weight": mat(i, h), q + "w3.weight": mat(i, h), q + "w2.weight": mat(h, i)})
    return sd


def make_files(folder: Path, shape: MoeShape, qtype: str, seed: int = 0) -> tuple[Path, Path]:
    """(the GGUF, a rank-16 LoRA on q/k/v/o and every expert in PEFT's per-expert layout), made once."""
    from safetensors.torch import save_file

    from ..layer_maps import get_layer_map
    from ..models.gguf_export import export_gguf
    from .make import tokenizer_metadata
    from ..io import atomic_path, write_json

    folder.mkdir(parents=True, exist_ok=True)
    tag = f"h{shape.hidden_size}-l{shape.num_hidden_layers}-e{shape.num_local_experts}"
    path, adapter = folder / f"moe-{tag}.{qtype}.gguf", folder / f"moe-{tag}-lora"
    if not path.exists():
        log.info("writing %s", path)
        export_gguf(_state_dict(shape, seed), shape.hf_config(), get_layer_map("mixtral"), path, qtype,
                    tokenizer=tokenizer_metadata(shape.vocab_size))
    if not (adapter / "adapter_model.safetensors").exists():
        g = torch.Generator().manual_seed(seed + 1)
        h, i, r = shape.hidden_size, shape.intermediate_size, 16
        kv = h // shape.num_attention_heads * shape.num_key_value_heads
        mods = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                "self_attn.o_proj": (h, h)}
        for x in range(shape.num_local_experts):
            mods.update({f"block_sparse_moe.experts.{x}.w1": (h, i), f"block_sparse_moe.experts.{x}.w3": (h, i),
                         f"block_sparse_moe.experts.{x}.w2": (i, h)})
        sd = {}
        for b in range(shape.num_hidden_layers):
            for m, (fin, fout) in mods.items():
                k = f"base_model.model.model.layers.{b}.{m}"
                sd[k + ".lora_A.weight"] = torch.randn(r, fin, generator=g) * fin ** -0.5
                sd[k + ".lora_B.weight"] = torch.randn(fout, r, generator=g) * 0.01
        write_json(adapter / "adapter_config.json", dict(
            peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, bias="none", lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]), force=True)
        with atomic_path(adapter / "adapter_model.safetensors") as tmp:
            save_file(sd, str(tmp))
    return path, adapter


def active_bytes(path: Path) -> dict[str, int]:
    """Bytes of weights one decode token reads: the routed share of the experts, one row of the token table."""
    from ..formats.gguf import GGUFFile

    gf = GGUFFile(path)
    k, n = gf.get(f"{gf.architecture}.expert_used_count"), gf.get(f"{gf.architecture}.expert_count")
    total = active = 0
    for t in gf.tensors.values():
        total += t.nbytes
        if t.name == "token_embd.weight":
            active += t.nbytes // t.shape[0]
        elif "_exps." in t.name:
            active += t.nbytes * k // n
        else:
            active += t.nbytes
    return {"file_bytes": total, "active_bytes_per_token": active}


def _qadapt_decode(path: Path, adapter: Path | None, tokens: int, runs: int) -> list[float]:
    import qadapt

    m = qadapt.load(path)
    if adapter is not None:
        m.load_adapter("moe", adapter, activate=True)
    out = []
    for run in range(runs + 1):
        cache = m.new_cache(tokens + 8)
        ids = torch.tensor([[1, 5, 9, 13]])
        logits = m.step(ids, torch.arange(4).unsqueeze(0), cache)
        t0 = time.perf_counter()
        for p in range(4, 4 + tokens):
            nxt = logits.argmax(-1).view(1, 1)
            logits = m.step(nxt, torch.tensor([[p]]), cache)
        if run:  # the first is a warm-up
            out.append(tokens / (time.perf_counter() - t0))
    return out


def _llama_cpp_decode(path: Path, tokens: int, runs: int, threads: int) -> list[float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(str(path), n_ctx=tokens + 16, n_threads=threads, n_threads_batch=threads, verbose=False)
    out = []
    for run in range(runs + 1):
        llm.reset()
        llm.eval([1, 5, 9, 13])
        t0 = time.perf_counter()
        for _ in range(tokens):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        if run:
            out.append(tokens / (time.perf_counter() - t0))
    return out


def measure(folder: Path, qtype: str = "Q8_0", quick: bool = False, tokens: int = 64, runs: int = 5,
            threads: int = 2) -> dict[str, Any]:
    from .measure import bandwidth_probe

    torch.set_num_threads(threads)
    shape = QUICK_MOE if quick else MoeShape()
    path, adapter = make_files(folder, shape, qtype)
    bw = bandwidth_probe(0.5 if quick else 1.0, 3 if quick else 5, threads)["read_gbs"]
    sizes = active_bytes(path)
    bound = bw * 1e9 / sizes["active_bytes_per_token"]
    rows = {"qadapt": _qadapt_decode(path, None, tokens, runs),
            "qadapt + LoRA (attention and every expert)": _qadapt_decode(path, adapter, tokens, runs)}
    cpp = _llama_cpp_decode(path, tokens, runs, threads)
    if cpp is not None:
        rows["llama.cpp"] = cpp
    return {"shape": asdict(shape), "qtype": qtype, "threads": threads, "read_gbs": round(bw, 2), **sizes,
            "bound_tps": round(bound, 1),
            "rows": [{"engine": k, "decode_tps": round(statistics.median(v), 1),
                      "fraction_of_bound": round(statistics.median(v) / bound, 3)} for k, v in rows.items()]}


def markdown(r: dict[str, Any]) -> str:
    s = r["shape"]
    lines = [f"Mixture-of-experts decode, batch 1 ({s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
             f"{s['num_local_experts']} experts of width {s['intermediate_size']}, {s['num_experts_per_tok']} per "
             f"token; {r['qtype']}, {r['threads']} threads). One token reads {r['active_bytes_per_token'] / 1e6:.0f} "
             f"MB of the file's {r['file_bytes'] / 1e6:.0f} MB; read bandwidth {r['read_gbs']} GB/s, so the bound is "
             f"{r['bound_tps']} tokens/s.", "", "| engine | decode tokens/s | fraction of the bound |", "|---|---:|---:|"]
    lines += [f"| {x['engine']} | {x['decode_tps']} | {x['fraction_of_bound']} |" for x in r["rows"]]
    return "\n".join(lines)
