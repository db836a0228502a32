"""What a serving replica's time goes to (``qadapt bench --serving-costs``): the costs tools/fleet_sim.py runs on.

On the benchmark model (the random ~0.8B Llama of :mod:`.make`, in place, ``qadapt.load``'s default kernels)
with its rank-16 adapters: the time to load an adapter from its folder (and its resident bytes), a
prompt's prefill per token, and one batched decode step of ``batch`` sequences as a function of how many
distinct adapters the rows use (1, 2, 4, ... ``batch``; 0 = the bare base), through :meth:`Model.step`,
the forward the server's engine runs.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def measure(cache: Path, fmt: str = "Q4_0", *, batch: int = 8, steps: int = 16, runs: int = 3, threads: int = 2,
            prompt_tokens: int = 64, quick: bool = False, adapter_dtype: str = "float32") -> dict[str, Any]:
    import qadapt

    from .make import make_bench_files
    from .spec import FULL, QUICK, LORA_RANK

    torch.set_num_threads(threads)
    files = make_bench_files(cache, QUICK if quick else FULL, (fmt,), threads=threads, adapter_dtype=adapter_dtype)
    m = qadapt.load(files.gguf(fmt))
    names = files.adapter_names[:batch]
    loads = []
    for i, name in enumerate(names * max(1, runs)):  # each adapter loaded, timed, kept (the step needs them)
        key = f"{name}#{i}"
        t = time.perf_counter()
        m.load_adapter(key, files.adapter(int(name[1:])))
        loads.append(time.perf_counter() - t)
        if i >= len(names):
            m.unload_adapter(key)
    keys = [f"{n}#{i}" for i, n in enumerate(names)]
    nbytes = statistics.median(m.adapters[k].nbytes for k in keys)
    g = torch.Generator().manual_seed(0)
    vocab = m.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=g)
    pre = []
    for _ in range(runs):
        cache1 = m.new_cache(prompt_tokens + 1, batch=1)
        t = time.perf_counter()
        m.step(prompt, torch.arange(prompt_tokens)[None], cache1, rows=((keys[0],),))
        pre.append(time.perf_counter() - t)
    step: dict[int, float] = {}
    kinds = [0] + [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= batch]
    start = 8
    for k in kinds:
        rows = tuple(() if k == 0 else (keys[i % k],) for i in range(batch))
        times = []
        for _ in range(runs):
            kv = m.new_cache(start + steps + 1, batch=batch)
            ids = torch.randint(0, vocab, (batch, start), generator=g)
            m.step(ids, torch.arange(start).expand(batch, start), kv, rows=rows)
            tok = torch.randint(0, vocab, (batch, 1), generator=g)
            t = time.perf_counter()
            for s in range(steps):
                m.step(tok, torch.full((batch, 1), start + s), kv, rows=rows)
            times.append((time.perf_counter() - t) / steps)
        step[k] = statistics.median(times)
        log.info("batch %d, %d distinct adapters: %.1f ms per step", batch, k, step[k] * 1e3)
    return {"model": str(files.gguf(fmt)), "format": fmt, "threads": threads, "batch": batch,
            "adapter_rank": LORA_RANK, "adapter_dtype": adapter_dtype, "adapter_bytes": int(nbytes), "adapter_load_s": statistics.median(loads),
            "prefill_s_per_token": statistics.median(pre) / prompt_tokens,
            "step_s_by_distinct_adapters": {str(k): v for k, v in step.items()}}


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Serving costs ({r['format']}, {r['threads']} threads; rank-{r['adapter_rank']} adapters of "
             f"{r['adapter_bytes'] / 2**20:.1f} MiB): adapter load {r['adapter_load_s'] * 1e3:.0f} ms, prefill "
             f"{r['prefill_s_per_token'] * 1e3:.2f} ms per prompt token.", "",
             f"| distinct adapters in a batch of {r['batch']} | decode step (ms) | tokens/s |", "|---:|---:|---:|"]
    for k, s in r["step_s_by_distinct_adapters"].items():
        lines.append(f"| {k} | {s * 1e3:.1f} | {r['batch'] / s:.1f} |")
    return "\n".join(lines)


def many_adapters(cache: Path, fmt: str = "Q4_0", *, adapters: int = 100, rows: int = 16, steps: int = 16,
                  runs: int = 3, threads: int = 2, zipf: float = 1.0, quick: bool = False,
                  adapter_dtype: str = "float32") -> dict[str, Any]:
    """``adapters`` rank-16 adapters resident (the benchmark's eight folders loaded again under new names:
    separate copies in memory), ``rows`` sequences decoding together, each on an adapter drawn from a Zipf
    law, against the same rows on one adapter; resident bytes per adapter (the factors qadapt holds, and
    the process's resident-set growth per adapter). ``adapter_dtype``: the dtype the adapter files store
    their factors in (``bfloat16``: as PEFT saves adapters trained in bf16; qadapt holds them as stored)."""
    import random

    import qadapt

    from ..server.http import rss_bytes
    from .make import make_bench_files
    from .spec import FULL, QUICK

    torch.set_num_threads(threads)
    files = make_bench_files(cache, QUICK if quick else FULL, (fmt,), threads=threads, adapter_dtype=adapter_dtype)
    m = qadapt.load(files.gguf(fmt))
    rss0 = rss_bytes() or 0
    names = [f"x{k}" for k in range(adapters)]
    folders = [files.adapter(k) for k in range(len(files.adapter_names))]
    for k, name in enumerate(names):
        m.load_adapter(name, folders[k % len(folders)])
    rss1 = rss_bytes() or 0
    rng = random.Random(0)
    weights = [1 / (i + 1) ** zipf for i in range(adapters)]
    drawn = tuple((n,) for n in rng.choices(names, weights, k=rows))
    vocab = m.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def tps(row_names) -> float:
        times = []
        for _ in range(runs):
            kv = m.new_cache(8 + steps + 1, batch=rows)
            m.step(torch.randint(0, vocab, (rows, 8), generator=g), torch.arange(8).expand(rows, 8), kv,
                   rows=row_names)
            tok = torch.randint(0, vocab, (rows, 1), generator=g)
            t = time.perf_counter()
            for s in range(steps):
                m.step(tok, torch.full((rows, 1), 8 + s), kv, rows=row_names)
            times.append(time.perf_counter() - t)
        return rows * steps / statistics.median(times)

    zipf_tps, one_tps = tps(drawn), tps(((names[0],),) * rows)
    return {"model": str(files.gguf(fmt)), "format": fmt, "threads": threads, "adapters": adapters, "rows": rows,
            "adapter_dtype": adapter_dtype,
            "distinct_in_batch": len(set(drawn)), "zipf_s": zipf,
            "adapter_bytes_held": int(statistics.median(m.adapters[n].nbytes for n in names)),
            "rss_growth_per_adapter": (rss1 - rss0) / adapters if rss0 else None,
            "tps_zipf_adapters": zipf_tps, "tps_one_adapter": one_tps, "ratio": zipf_tps / one_tps}


def many_markdown(r: dict[str, Any]) -> str:
    rss = r["rss_growth_per_adapter"]
    return (f"{r['adapters']} rank-16 adapters resident ({r['adapter_bytes_held'] / 2**20:.1f} MiB of "
            f"{r.get('adapter_dtype', 'float32')} factors each"
            + (f", resident set +{rss / 2**20:.1f} MiB per adapter" if rss else "") + f"); {r['rows']} sequences "
            f"decoding together ({r['format']}, {r['threads']} threads):\n\n"
            "| adapters of the batch | aggregate tokens/s |\n|---|---:|\n"
            f"| Zipf s={r['zipf_s']} over {r['adapters']} ({r['distinct_in_batch']} distinct) | "
            f"{r['tps_zipf_adapters']:.1f} |\n| one adapter | {r['tps_one_adapter']:.1f} |\n\n"
            f"Ratio {r['ratio']:.2f}.")
