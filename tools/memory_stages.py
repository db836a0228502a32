#!/usr/bin/env python
"""Where a qadapt process's resident memory goes, stage by stage, on the benchmark's model.

The benchmark's ``rss_over_files`` is one number over a worker's whole life (six loads, six
rounds); this prints the resident set after each stage of one load and one round, against the
same baseline (the libraries imported, nothing loaded):

    python tools/memory_stages.py --format Q4_0 --kernels q8        # the bench model must exist:
    python tools/bench.py --quick --out /tmp/b                      # (or a full run) creates it

Columns: MB added to the baseline now, the peak so far, and both over the file plus the adapters.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from qadapt.bench.engines import QadaptEngine
from qadapt.bench.make import bench_folder
from qadapt.bench.measure import peak_rss_bytes, rss_bytes
from qadapt.bench.spec import FULL, QUICK, BenchSettings
from qadapt.bench.worker import prompt_ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="Q4_0", help="GGUF file of the bench model: Q4_0, Q8_0, Q4_K_M, F16")
    ap.add_argument("--kernels", default="q8", choices=("q8", "inplace"),
                    help="q8: kernels='q8'; inplace: the exact in-place kernels (the default runtime)")
    ap.add_argument("--quick", action="store_true", help="the small model of `tools/bench.py --quick`")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="one JSON object per stage instead of the table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = BenchSettings()
    shape = QUICK if args.quick else FULL
    files = bench_folder(settings.cache, shape, settings.seed)
    path = files.gguf(args.format)
    if not path.exists():
        print(f"memory_stages: {path} does not exist: run `python tools/bench.py{' --quick' if args.quick else ''} "
              f"--formats {args.format} --out DIR` first", file=sys.stderr)
        return 2
    names = files.adapter_names
    denom = path.stat().st_size + sum(f.stat().st_size for k in range(len(names))
                                      for f in files.adapter(k).glob("*.safetensors"))
    torch.set_num_threads(args.threads)
    engine = QadaptEngine(path, args.kernels, args.threads)
    engine.prepare()
    base = rss_bytes()

    def stage(name: str) -> None:
        now, peak = (rss_bytes() - base) / 1e6, (peak_rss_bytes() - base) / 1e6
        if args.json:
            print(json.dumps({"stage": name, "rss_mb": now, "peak_mb": peak, "files_mb": denom / 1e6}))
        else:
            print(f"{name:34s} {now:8.1f} MB  peak {peak:8.1f} MB  {now * 1e6 / denom:5.2f}x / {peak * 1e6 / denom:5.2f}x")

    if not args.json:
        print(f"{path.name} + {len(names)} adapters: {denom / 1e6:.1f} MB of files")
    engine.load()
    stage("model loaded")
    for k, name in enumerate(names):
        engine.add_adapter(name, files.adapter(k), files.lora_gguf(k))
    stage(f"{len(names)} adapters loaded")
    prompt = prompt_ids(shape.vocab_size, settings.prompt_tokens, 0)
    for active in ((), (names[0],), tuple(names[:2])):
        engine.prefill_decode(prompt, settings.decode_tokens, active)
        stage(f"prefill {len(prompt)} + decode {settings.decode_tokens}, {len(active)} active")
    prompts = [prompt_ids(shape.vocab_size, settings.batch_prompt_tokens, 1 + r) for r in range(len(names))]
    engine.batched(prompts, settings.decode_tokens, names)
    stage(f"{len(names)} rows on {len(names)} adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
