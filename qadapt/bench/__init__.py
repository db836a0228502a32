"""Benchmark harness: qadapt beside llama.cpp and transformers + PEFT, against the memory-bandwidth bound.

``tools/bench.py`` and ``qadapt bench`` are thin entries over :func:`run_bench`.
The pieces, one file each:

- :mod:`.spec`: the model shapes (full ~0.8B Llama, quick) and the run settings;
- :mod:`.make`: makes (or reuses, cached atomically) the random model as a transformers
  checkpoint, GGUF F16 / Q8_0 / Q4_0 (gguf-py) and Q4_K_M (llama.cpp's quantizer), and
  rank-16 q,k,v,o LoRA adapters in PEFT format and as llama.cpp adapter GGUFs;
- :mod:`.engines`: one class per engine with the same five operations (load, prefill,
  decode, switch adapter, batched decode);
- :mod:`.worker`: a subprocess holding one engine, so that its peak memory is its own;
- :mod:`.measure`: the bandwidth probe, timers, resident-memory readings, statistics;
- :mod:`.runner`: spawns the workers of a format together and interleaves their runs;
- :mod:`.report`: ``bench.json``, ``bench.md`` and ``bench.png``.
"""

from __future__ import annotations

from .runner import run_bench
from .spec import BenchSettings

__all__ = ["BenchSettings", "run_bench"]
