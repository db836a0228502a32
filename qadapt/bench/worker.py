"""One engine in its own process, so that its resident memory is its own.

``python -m qadapt.bench.worker '<json spec>'`` then reads one JSON command per line on
stdin and answers one JSON line each (on the original stdout; anything the engines
print, C libraries included, goes to stderr):

- ``{"op": "load"}``: drop the model if loaded, load it (timed), load the adapters (timed);
- ``{"op": "round", ...}``: one sample of every other metric (see :func:`one_round`; with
  ``"task": "xlora"`` in the spec, :func:`xlora_load` and :func:`xlora_round` instead);
- ``{"op": "info"}``: peak and current resident memory, weight bytes per token;
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from .engines import Engine, QadaptXLoraEngine, Unsupported, make_engine
from .make import BenchFiles
from .measure import peak_rss_bytes, rss_bytes
from .spec import XLORA_EXPERTS, XLORA_NON_GRANULAR_INDEX, ModelShape

#: the adapter sets of the batch-1 measurements
ADAPTER_SETS = ((), ("a0",), ("a0", "a1"))
SWITCH_REPEATS = 20


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    """Deterministic token ids in [2, vocab) (0 and 1 are EOS and BOS)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(2, vocab) for _ in range(n)]


def load(engine: Engine, files: BenchFiles) -> dict:
    engine.unload()
    t0 = time.perf_counter()
    engine.load()
    t1 = time.perf_counter()
    names = files.adapter_names
    for k, name in enumerate(names):
        engine.add_adapter(name, files.adapter(k), files.lora_gguf(k))
    t2 = time.perf_counter()
    return {"metrics": [{"metric": "load_s", "adapters": 0, "value": t1 - t0},
                        {"metric": "adapter_load_ms", "adapters": 1, "value": (t2 - t1) / len(names) * 1e3}]}


def one_round(engine: Engine, files: BenchFiles, cmd: dict) -> dict:
    """Prefill (``prompt_tokens``) and decode (``decode_tokens``) with 0, 1, 2 adapters; adapter
    switch latency; batched decode of ``batch`` rows on as many adapters."""
    vocab = files.shape.vocab_size
    prompt = prompt_ids(vocab, cmd["prompt_tokens"], 0)
    n = cmd["decode_tokens"]
    out, skipped = [], {}
    for names in ADAPTER_SETS:
        p, d = engine.prefill_decode(prompt, n, names)
        out.append({"metric": "prefill_tps", "adapters": len(names), "value": len(prompt) / p})
        out.append({"metric": "decode_tps", "adapters": len(names), "value": n / d})
    t0 = time.perf_counter()
    for i in range(SWITCH_REPEATS):
        engine.switch(files.adapter_names[i % 2])
    out.append({"metric": "switch_ms", "adapters": 1, "value": (time.perf_counter() - t0) / SWITCH_REPEATS * 1e3})
    B = cmd["batch"]
    prompts = [prompt_ids(vocab, cmd["batch_prompt_tokens"], 1 + r) for r in range(B)]
    # the batched rates over this round's one-row rate with one adapter: ratios of two figures taken seconds
    # apart, which a machine's drift between rounds cannot skew the way a ratio of medians can
    single = next(m["value"] for m in out if m["metric"] == "decode_tps" and m["adapters"] == 1)
    # B rows on B different adapters (adapters=B), then on one shared adapter (adapters=1: what a peer that
    # applies one adapter set per batch, llama.cpp, can run)
    for k, names in ((B, files.adapter_names[:B]), (1, files.adapter_names[:1] * B)):
        try:
            t = engine.batched(prompts, cmd["batch_decode_tokens"], names)
        except Unsupported as e:
            skipped["batched_tps" if k == B else "batched_tps, shared adapter"] = str(e)
            continue
        out.append({"metric": "batched_tps", "adapters": k, "value": B * cmd["batch_decode_tokens"] / t})
        out.append({"metric": "batched_over_single", "adapters": k, "value": out[-1]["value"] / single})
    return {"metrics": out, "skipped": skipped}


def xlora_load(engine: QadaptXLoraEngine) -> dict:
    """Base model, classifier and every expert (``qadapt.load(..., xlora=...)``), timed as one."""
    engine.unload()
    t0 = time.perf_counter()
    engine.load()
    return {"metrics": [{"metric": "xlora_load_s", "adapters": XLORA_EXPERTS, "value": time.perf_counter() - t0}]}


def xlora_round(engine: QadaptXLoraEngine, files: BenchFiles, cmd: dict) -> dict:
    """X-LoRA prefill and decode with granular scalings (a scaling pass every step), then non-granular
    (``tgt_non_granular_index``: frozen from the prompt, no scaling pass while decoding).

    The scaling passes each decode ran are checked, so that the two really are what they are named.
    """
    prompt = prompt_ids(files.shape.vocab_size, cmd["prompt_tokens"], 0)
    n = cmd["decode_tokens"]
    out = []
    for metric, k, want in (("xlora", None, n), ("xlora_nongranular", XLORA_NON_GRANULAR_INDEX, 0)):
        p, d, passes = engine.prefill_decode_xlora(prompt, n, k)
        if passes != want:
            raise RuntimeError(f"X-LoRA {metric}: the decode ran {passes} scaling pass(es) for {n} tokens, "
                               f"expected {want}")
        out.append({"metric": f"{metric}_prefill_tps", "adapters": XLORA_EXPERTS, "value": len(prompt) / p})
        out.append({"metric": f"{metric}_decode_tps", "adapters": XLORA_EXPERTS, "value": n / d})
    return {"metrics": out}


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C libraries writing to fd 1 must not corrupt the protocol
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    files = BenchFiles(Path(spec["folder"]), ModelShape(**spec["shape"]),
                       adapter_dtype=spec.get("adapter_dtype", "float32"))
    try:
        engine = make_engine(spec["engine"], spec["format"], spec["mode"], files, spec["threads"],
                             spec.get("task", ""))
    except Exception as e:  # noqa: BLE001 - reported to the runner as this engine's skip reason
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    try:
        engine.prepare()
    except Exception:  # noqa: BLE001 - load reports the real failure
        pass
    start_rss = rss_bytes()  # libraries imported, no model yet: what loading adds is measured against this
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        try:
            xl = isinstance(engine, QadaptXLoraEngine)
            if op == "load":
                reply = xlora_load(engine) if xl else load(engine, files)
            elif op == "round":
                reply = xlora_round(engine, files, cmd) if xl else one_round(engine, files, cmd)
            elif op == "info":
                reply = {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes(), "start_rss_bytes": start_rss,
                         "weight_bytes_per_token": engine.weight_bytes()}
            elif op == "quit":
                proto.write(json.dumps({"bye": True}) + "\n")
                return 0
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - the runner records it and drops this engine
            logging.getLogger(__name__).exception("worker %s %s failed", spec["engine"], op)
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
