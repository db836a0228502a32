#!/usr/bin/env python
"""Load time and load-to-first-token, qadapt or llama.cpp, in this fresh process.

The file is read once first (so the load finds it in the page cache, as a second run would); then the
engine loads it (timed) and runs one prefill of ``--prompt`` tokens (timed from the load's start): what
a user waits for, including work a load defers (qadapt's background 8-row repack). One JSON line.

Run it with Python's bytecode cache on (as an installed package has it): with PYTHONDONTWRITEBYTECODE set,
every module the load imports is compiled from source each run (~20 ms that no user pays); the JSON
line says which (``bytecode_cache``).

    env -u PYTHONDONTWRITEBYTECODE python tools/first_token.py qadapt ~/.cache/qadapt/bench/llama-0.8b-*/model.Q8_0.gguf
    python tools/first_token.py llama.cpp ~/.cache/qadapt/bench/llama-0.8b-*/model.Q8_0.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", choices=["qadapt", "llama.cpp"])
    p.add_argument("gguf", type=Path)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens of the first prefill (default 128)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from qadapt.bench.big import warm_page_cache

    warm_page_cache(a.gguf)
    ids = list(range(2, 2 + a.prompt))
    if a.engine == "qadapt":
        import torch

        import qadapt
        import qadapt.load_model  # noqa: F401 - the library loaded before the clock, as llama_cpp's import loads its
        from qadapt.quant import native

        native.library()  # (and its kernels' shared object)
        torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        m = qadapt.load(a.gguf)
        t1 = time.perf_counter()
        with torch.inference_mode():
            m.step(torch.tensor([ids]), torch.arange(len(ids))[None], m.new_cache(len(ids) + 1))
    else:
        from llama_cpp import Llama

        t0 = time.perf_counter()
        llm = Llama(str(a.gguf), n_ctx=max(512, a.prompt + 1), n_threads=a.threads, n_threads_batch=a.threads,
                    verbose=False)
        t1 = time.perf_counter()
        llm.eval(ids)
    t2 = time.perf_counter()
    print(json.dumps({"engine": a.engine, "file": a.gguf.name, "load_s": round(t1 - t0, 3),
                      "load_to_first_token_s": round(t2 - t0, 3),
                      "bytecode_cache": not sys.flags.dont_write_bytecode}))


if __name__ == "__main__":
    main()
