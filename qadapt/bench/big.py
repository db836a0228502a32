"""A real-size model on the CPU (``qadapt bench --real-size Q4_K_M``): Llama-3-8B's shape beside llama.cpp.

A random GGUF of Llama 3 8B's shape (hidden 4096, 32 layers, 8 KV heads, FFN 14336, vocab 128,256; random
blocks of the type, :mod:`.random_gguf`) and a rank-16 LoRA on q/k/v/o (a PEFT folder for qadapt, the
same factors as llama.cpp's LoRA GGUF for llama.cpp); per engine: load time, prefill of ``prompt`` tokens
and decode tokens/s with and without the LoRA, and the bound (weight bytes one token reads over the
machine's read bandwidth).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def measure(cache: Path, fmt: str = "Q4_K_M", *, prompt: int = 512, tokens: int = 16, threads: int = 2,
            engines: tuple[str, ...] = ("qadapt", "llama.cpp")) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from .engines import LlamaCppEngine, QadaptEngine
    from .make import write_lora_gguf
    from .measure import bandwidth_probe
    from .random_gguf import LLAMA3_8B, write_adapter, write_model
    from .spec import ModelShape

    torch.set_num_threads(threads)
    s = LLAMA3_8B
    shape = ModelShape("llama3-8b", s["hidden"], s["layers"], s["ff"], s["vocab"], s["heads"], s["kv_heads"])
    folder = Path(cache) / "llama3-8b-random"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model.{fmt}.gguf"
    read = write_model(path, s, fmt) if not path.exists() else None
    if read is None:
        from ..formats.gguf import GGUFFile

        gf = GGUFFile(path)
        read = sum(t.nbytes for t in gf.tensors.values() if t.name != "token_embd.weight")
    adapter = folder / "lora"
    if not (adapter / "adapter_model.safetensors").exists():
        write_adapter(adapter, s, 0)
    lora_gguf = folder / "lora.gguf"
    if not lora_gguf.exists():
        write_lora_gguf(load_file(str(adapter / "adapter_model.safetensors")), shape, lora_gguf)
    bw = bandwidth_probe(threads=threads)["read_gbs"] * 1e9
    rng = random.Random(0)
    ids = [rng.randrange(2, s["vocab"]) for _ in range(prompt)]
    rows: list[dict[str, Any]] = []
    for name in engines:
        eng = QadaptEngine(path, "q8", threads) if name == "qadapt" else LlamaCppEngine(path, threads,
                                                                                           n_ctx=prompt + tokens + 16,
                                                                                           n_batch=512)
        t = time.perf_counter()
        try:
            eng.load()
        except Exception as e:
            rows.append({"engine": name, "error": f"{type(e).__name__}: {e}"})
            continue
        row: dict[str, Any] = {"engine": name, "load_s": time.perf_counter() - t}
        eng.add_adapter("a0", adapter, lora_gguf)
        for label, ads in (("lora", ["a0"]), ("base", [])):
            pre, dec = eng.prefill_decode(ids, tokens, ads)
            row[f"decode_tps_{label}"], row[f"prefill_tps_{label}"] = tokens / dec, prompt / pre
            log.info("%s %s: decode %.2f tok/s, prefill %.1f tok/s", name, label, tokens / dec, prompt / pre)
        eng.unload()
        rows.append(row)
    return {"format": fmt, "threads": threads, "prompt": prompt, "tokens": tokens, "bytes_per_token": read,
            "bound_tps": None if bw is None else bw / read, "file_bytes": path.stat().st_size, "rows": rows}


def markdown(r: dict[str, Any]) -> str:
    bound = r["bound_tps"]
    lines = [f"Llama-3-8B shape, {r['format']} ({r['file_bytes'] / 1e9:.2f} GB), {r['threads']} threads; one token "
             f"reads {r['bytes_per_token'] / 1e9:.2f} GB" + (f", bound {bound:.2f} tok/s" if bound else "") + ".", "",
             "| engine | load s | decode tok/s (LoRA) | decode (base) | prefill tok/s (LoRA) | of the bound |",
             "|---|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['engine']} | {x['error']} |||||")
            continue
        frac = f"{x['decode_tps_base'] / bound:.2f}" if bound else "-"
        lines.append(f"| {x['engine']} | {x['load_s']:.2f} | {x['decode_tps_lora']:.2f} | {x['decode_tps_base']:.2f} "
                     f"| {x['prefill_tps_lora']:.1f} | {frac} |")
    return "\n".join(lines)
