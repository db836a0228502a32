"""Real-size models on the CPU (``qadapt bench --real-size Q4_K_M [--real-shape qwen3-4b]``) beside the peers.

A random GGUF of a real model's shape (:data:`.random_gguf.SHAPES`: Llama 3 8B, hidden 4096, 32 layers,
8 KV heads, FFN 14336, vocab 128,256; Qwen3 4B, hidden 2560, 36 layers, head_dim 128, q/k norms, tied
output; random blocks of the type) and a rank-16 LoRA on q/k/v/o (a PEFT folder for qadapt and mistral.rs,
the same factors as llama.cpp's LoRA GGUF for llama.cpp). Each engine runs in its own process (so that its
resident memory is its own): load time, prefill of ``prompt`` tokens and decode tokens/s with and without
the LoRA (after one warm-up request of 32 prompt tokens and 2 new ones: the time from load's start to its
end is "load to first tokens", where work a load defers shows), and its peak resident set over the file plus the adapter; the
file is read once before each engine loads, so that every load finds it in the page cache. The bound is the
weight bytes one token reads over the machine's read bandwidth. mistral.rs (:mod:`.mistralrs_engine`) refuses LoRA on Llama GGUFs:
there its row has the base model only and ``lora_skipped``.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def files_for(cache: Path, shape_name: str, fmt: str, adapter_dtype: str = "float32") -> dict[str, Any]:
    """The model of ``shape_name`` as ``fmt`` and its adapter (PEFT folder + llama.cpp LoRA GGUF), made once."""
    import torch
    from safetensors.torch import load_file

    from .make import write_lora_gguf
    from .random_gguf import SHAPES, hf_config, write_adapter, write_model

    s = SHAPES[shape_name]
    folder = Path(cache) / f"{shape_name}-random"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model.{fmt}.gguf"
    read = write_model(path, s, fmt) if not path.exists() else None
    if read is None:  # the same count write_model returns: every tensor a token reads (a tied embedding whole)
        from ..formats.gguf import GGUFFile

        gf = GGUFFile(path)
        read = sum(t.nbytes for t in gf.tensors.values() if t.name != "token_embd.weight" or s.get("tied"))
    suffix = "" if adapter_dtype == "float32" else f"-{adapter_dtype}"
    adapter = folder / f"lora{suffix}"
    if not (adapter / "adapter_model.safetensors").exists():
        write_adapter(adapter, s, 0, dtype=getattr(torch, adapter_dtype))
    lora_gguf = folder / f"lora{suffix}.gguf"
    if not lora_gguf.exists():
        write_lora_gguf(load_file(str(adapter / "adapter_model.safetensors")), hf_config(s), lora_gguf,
                        arch=s["arch"], half=adapter_dtype != "float32")
    return {"shape": s, "path": path, "read": read, "adapter": adapter, "lora_gguf": lora_gguf}


def measure(cache: Path, fmt: str = "Q4_K_M", *, shape: str = "llama3-8b", prompt: int = 512, tokens: int = 16,
            threads: int = 2, engines: tuple[str, ...] = ("qadapt", "llama.cpp"),
            adapter_dtype: str = "float32") -> dict[str, Any]:
    import multiprocessing

    from .measure import bandwidth_probe

    f = files_for(cache, shape, fmt, adapter_dtype)
    s = f["shape"]
    bw = bandwidth_probe(threads=threads)["read_gbs"] * 1e9
    rng = random.Random(0)
    ids = [rng.randrange(2, s["vocab"]) for _ in range(prompt)]
    rows: list[dict[str, Any]] = []
    ctx = multiprocessing.get_context("spawn")
    for name in engines:
        warm_page_cache(f["path"])  # every engine loads from the page cache, none pays the disk read for the next
        with ctx.Pool(1) as pool:  # a fresh process per engine: its resident memory is its own
            row = pool.apply(_engine_row, (name, str(f["path"]), str(f["adapter"]), str(f["lora_gguf"]), ids,
                                           tokens, threads))
        rows.append(row)
    adapter_bytes = sum(p.stat().st_size for p in f["adapter"].iterdir())
    return {"shape": shape, "format": fmt, "threads": threads, "prompt": prompt, "tokens": tokens,
            "adapter_dtype": adapter_dtype, "bytes_per_token": f["read"], "bound_tps": bw / f["read"],
            "file_bytes": f["path"].stat().st_size, "adapter_bytes": adapter_bytes, "rows": rows}


def warm_page_cache(path: Path) -> None:
    """Read the file once (64 MiB at a time), so that the next load finds it in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(64 << 20)
        while fh.readinto(buf):
            pass


def _engine_row(name: str, path: str, adapter: str, lora_gguf: str, ids: list[int], tokens: int,
                threads: int) -> dict[str, Any]:
    """One engine, in this (fresh) process: load, the adapter, prefill + decode with and without it, memory."""
    import os

    from .engines import LlamaCppEngine, QadaptEngine, Unsupported

    os.dup2(2, 1)  # engines that log to stdout (mistral.rs) must not mix into the parent's --json output
    from .measure import peak_rss_bytes, rss_bytes

    logging.basicConfig(level=logging.INFO)
    try:
        if name == "qadapt":
            eng = QadaptEngine(Path(path), "q8", threads)
        elif name == "mistral.rs":
            from .mistralrs_engine import MistralRsEngine

            eng = MistralRsEngine(Path(path), threads)
        else:
            eng = LlamaCppEngine(Path(path), threads, n_ctx=len(ids) + tokens + 16, n_batch=512)
        eng.prepare()
        rss0 = rss_bytes()
        t = time.perf_counter()
        eng.load()
    except Exception as e:  # noqa: BLE001 - reported as the engine's row
        return {"engine": name, "error": f"{type(e).__name__}: {e}"}
    row: dict[str, Any] = {"engine": name, "load_s": time.perf_counter() - t}
    labels: tuple[tuple[str, list[str]], ...] = (("lora", ["a0"]), ("base", []))
    try:
        eng.add_adapter("a0", Path(adapter), Path(lora_gguf))
    except Unsupported as e:  # mistral.rs on a Llama GGUF: the base model only
        row["lora_skipped"], labels = str(e), labels[1:]
    eng.prefill_decode(ids[:32], 2, labels[0][1])  # warm-up (first-use costs): timed as the first tokens only
    row["first_tokens_s"] = time.perf_counter() - t  # from load's start to the warm-up's 2 tokens
    for label, ads in labels:
        pre, dec = eng.prefill_decode(ids, tokens, ads)
        row[f"decode_tps_{label}"], row[f"prefill_tps_{label}"] = tokens / dec, len(ids) / pre
        log.info("%s %s: decode %.2f tok/s, prefill %.1f tok/s", name, label, tokens / dec, len(ids) / pre)
    row["rss_added_bytes"] = peak_rss_bytes() - rss0
    eng.unload()
    return row


def markdown(r: dict[str, Any]) -> str:
    bound = r["bound_tps"]
    held = r["file_bytes"] + r["adapter_bytes"]
    lines = [f"{r.get('shape', 'llama3-8b')} shape, {r['format']} ({r['file_bytes'] / 1e9:.2f} GB), {r['threads']} "
             f"threads, prompt {r['prompt']} tokens, {r['tokens']} decode tokens; one token reads "
             f"{r['bytes_per_token'] / 1e9:.2f} GB, bound {bound:.2f} tok/s; LoRA rank 16 on q/k/v/o "
             f"({r.get('adapter_dtype', 'float32')} factors).", "",
             "| engine | load s | load to first tokens s | decode tok/s (LoRA) | decode (base) | prefill tok/s (LoRA) "
             "| prefill (base) | decode / bound | peak RSS added / (file + adapter) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['engine']} | {x['error']} ||||||||")
            continue
        lora = (f"{x['decode_tps_lora']:.2f}", f"{x['prefill_tps_lora']:.1f}") if "decode_tps_lora" in x else ("-", "-")
        rss = f"{x['rss_added_bytes'] / held:.2f}" if x.get("rss_added_bytes") else "-"
        first = f"{x['first_tokens_s']:.2f}" if "first_tokens_s" in x else "-"
        lines.append(f"| {x['engine']} | {x['load_s']:.2f} | {first} | {lora[0]} | {x['decode_tps_base']:.2f} | {lora[1]} "
                     f"| {x['prefill_tps_base']:.1f} | {x['decode_tps_base'] / bound:.2f} | {rss} |")
    skipped = [f"{x['engine']}: {x['lora_skipped']}" for x in r["rows"] if "lora_skipped" in x]
    return "\n".join(lines + ([""] + [f"LoRA not measured on {s}" for s in skipped] if skipped else []))
