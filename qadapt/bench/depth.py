"""Decode speed at long contexts (``qadapt bench --depths 128,4096,16384``), beside llama.cpp.

The benchmark model's GGUF is copied once with a longer ``llama.context_length`` (gguf-py's
``copy_with_new_metadata``; the weights are the same bytes, rotary positions need no change), then each
engine prefills a random prompt of each depth with one rank-16 LoRA active and decodes ``tokens`` more:
decode tokens/s at that depth (the KV cache filled by the prefill), and the prefill's tokens/s.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def long_context_copy(src: Path, dst: Path, context: int) -> Path:
    """``src`` with ``llama.context_length = context`` (made once, atomically)."""
    if dst.exists():
        return dst
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from ..io import atomic_path

    reader = gguf.GGUFReader(str(src))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        copy_with_new_metadata(reader, writer, {f"{arch}.context_length": MetadataDetails(
            gguf.GGUFValueType.UINT32, context)}, [])
    return dst


def measure(cache: Path, fmt: str = "Q4_0", *, depths: tuple[int, ...] = (128, 4096, 16384), tokens: int = 32,
            threads: int = 2, engines: tuple[str, ...] = ("qadapt", "llama.cpp"), quick: bool = False,
            adapter_dtype: str = "float32") -> dict[str, Any]:
    import torch

    from .engines import LlamaCppEngine, QadaptEngine
    from .make import make_bench_files
    from .spec import FULL, QUICK

    torch.set_num_threads(threads)
    files = make_bench_files(cache, QUICK if quick else FULL, (fmt,), threads=threads, adapter_dtype=adapter_dtype)
    ctx = 1 << (max(depths) + tokens + 16 - 1).bit_length()
    path = long_context_copy(files.gguf(fmt), files.folder / f"model.{fmt}.ctx{ctx}.gguf", ctx)
    rng = random.Random(0)
    vocab = files.shape.vocab_size
    prompts = {d: [rng.randrange(2, vocab) for _ in range(d)] for d in depths}
    rows = []
    for name in engines:
        eng = QadaptEngine(path, "q8", threads) if name == "qadapt" else LlamaCppEngine(path, threads, n_ctx=ctx, n_batch=512)
        try:
            eng.load()
        except Exception as e:  # llama-cpp-python not installed: the row says so
            rows.append({"engine": name, "error": f"{type(e).__name__}: {e}"})
            continue
        eng.add_adapter("a0", files.adapter(0), files.lora_gguf(0))
        for d in depths:
            pre, dec = eng.prefill_decode(prompts[d], tokens, ["a0"])
            rows.append({"engine": name, "depth": d, "decode_tps": tokens / dec, "prefill_tps": d / pre})
            log.info("%s at depth %d: decode %.1f tok/s, prefill %.0f tok/s", name, d, tokens / dec, d / pre)
        eng.unload()
    return {"format": fmt, "threads": threads, "tokens": tokens, "context": ctx, "rows": rows}


def markdown(r: dict[str, Any]) -> str:
    by = {(x["engine"], x.get("depth")): x for x in r["rows"]}
    depths = sorted({x["depth"] for x in r["rows"] if "depth" in x})
    lines = [f"Decode with one LoRA after a prompt of each depth ({r['format']}, {r['threads']} threads, "
             f"{r['tokens']} tokens):", "", "| depth | qadapt tok/s | llama.cpp tok/s | ratio | qadapt prefill | "
             "llama.cpp prefill |", "|---:|---:|---:|---:|---:|---:|"]
    for d in depths:
        q, c = by.get(("qadapt", d)), by.get(("llama.cpp", d))
        ratio = f"{q['decode_tps'] / c['decode_tps']:.2f}x" if q and c else "-"
        lines.append(f"| {d} | {q['decode_tps']:.1f} | " if q else f"| {d} | - | ")
        lines[-1] += (f"{c['decode_tps']:.1f} | " if c else "- | ") + ratio + " | " + \
            (f"{q['prefill_tps']:.0f} | " if q else "- | ") + (f"{c['prefill_tps']:.0f} |" if c else "- |")
    errors = [f"{x['engine']}: {x['error']}" for x in r["rows"] if "error" in x]
    return "\n".join(lines + errors)
