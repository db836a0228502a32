"""The benchmark harness: a ``--quick`` smoke run on qadapt engines, and the files it makes for the peers.

Speed is never asserted here (speed claims live in docs/bench, made by tools/bench.py);
what is checked is that the harness runs end to end and writes its outputs, that the
ceiling it reports is computed from the file's real tensor bytes (gguf-py's reader), and
that the llama.cpp adapter it writes is the adapter the PEFT files describe (llama.cpp
against transformers + PEFT), so the peers are measured on the same LoRA maths.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from qadapt.bench import BenchSettings, run_bench
from qadapt.bench.engines import LlamaCppEngine
from qadapt.bench.make import make_bench_files, random_state_dict
from qadapt.bench.spec import QUICK
from qadapt.errors import InputError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def quick_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    settings = BenchSettings(out=out, cache=cache, quick=True, engines=("qadapt",), formats=("Q4_0",),
                             modes=("inplace",), runs=2, warmup=0, decode_tokens=8, prompt_tokens=16)
    return settings, run_bench(settings)


def test_quick_smoke_writes_json_md_png(quick_run):
    """End to end on the quick model; every metric present with median within [min, max]."""
    settings, report = quick_run
    data = json.loads((settings.out / "bench.json").read_text())
    assert set(data) >= {"machine", "bandwidth_gbs", "results"} and data["bandwidth_gbs"] > 0
    rows = [r for r in data["results"] if r["engine"] == "qadapt"]
    for r in rows:
        assert set(r) >= {"engine", "format", "mode", "adapters", "metric", "median", "min", "max", "runs"}
        assert r["min"] <= r["median"] <= r["max"]
    got = {(r["metric"], r["adapters"]) for r in rows}
    assert got >= {("load_s", 0), ("prefill_tps", 0), ("decode_tps", 0), ("decode_tps", 1), ("decode_tps", 2),
                   ("switch_ms", 1), ("batched_tps", 8), ("peak_rss_mb", 8), ("decode_fraction_of_bound", 0)}
    assert all(r["runs"] == 2 for r in rows if r["metric"] == "decode_tps")
    md = (settings.out / "bench.md").read_text()
    assert "| Q4_0 | qadapt inplace |" in md and "bound" in md
    if importlib.util.find_spec("matplotlib"):
        assert (settings.out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_to_overwrite_without_force(quick_run):
    settings, _ = quick_run
    with pytest.raises(InputError, match="--force"):
        replace(settings, force=False).validate()
    replace(settings, force=True).validate()


def test_bound_uses_gguf_py_tensor_bytes(quick_run, cache):
    """Reference: gguf-py's reader. Bytes per token = all tensor bytes - embedding table + one embedding row."""
    import gguf

    settings, report = quick_run
    files = make_bench_files(cache, QUICK, ("Q4_0",))
    reader = gguf.GGUFReader(files.gguf("Q4_0"))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = total - int(emb.n_bytes) + int(emb.n_bytes) // QUICK.vocab_size
    bound = next(r for r in report["results"] if r["engine"] == "bound" and r["format"] == "Q4_0")
    assert bound["bytes_per_token"] == want
    assert bound["median"] == pytest.approx(report["bandwidth_gbs"] * 1e9 / want)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_adapter_gguf_matches_peft(cache):
    """llama.cpp (F16 base + the adapter GGUF we write) against transformers float32 + PEFT on the same weights.

    Reference: transformers + PEFT from the PEFT files. Tolerance 2e-2 on logits of size ~1: the
    F16 weights (rel. error ~5e-4) and llama.cpp's f16 activations in the matmuls; a wrong q/k row
    permutation of B, or a wrong scale, moves the adapter's effect (~0.1-1) far beyond it.
    """
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    files = make_bench_files(cache, QUICK, ("F16",))
    sd = {k: v.half().float() for k, v in random_state_dict(QUICK, 0).items()}  # what the F16 file holds
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**QUICK.hf_config())).float().eval()
    hf.load_state_dict(sd, strict=True)
    ids = [5, 17, 99, 1234, 42, 7, 3000, 11]
    with torch.no_grad():
        base = hf(torch.tensor([ids])).logits[0, -1].numpy()
        ref = PeftModel.from_pretrained(hf, str(files.adapter(0))).eval()(torch.tensor([ids])).logits[0, -1].numpy()

    eng = LlamaCppEngine(files.gguf("F16"), threads=2, n_ctx=64)
    eng.load()
    try:
        eng.llm.eval(ids)
        got_base = eng.last_logits().copy()
        eng.add_adapter("a0", files.adapter(0), files.lora_gguf(0))
        eng.switch("a0")
        eng.llm.reset()
        eng.llm.eval(ids)
        got = eng.last_logits().copy()
    finally:
        eng.unload()
    assert np.abs(ref - base).max() > 0.1  # the adapter really changes the output
    np.testing.assert_allclose(got_base, base, atol=2e-2)
    np.testing.assert_allclose(got, ref, atol=2e-2)
