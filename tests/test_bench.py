"""The benchmark harness: a ``--quick`` smoke run on qadapt engines, and the files it makes for the peers.

Speed is never asserted here (speed claims live in docs/bench, made by tools/bench.py);
what is checked is that the harness runs end to end and writes its outputs in the JSON
schema CI and the docs read, that the ceiling it reports is computed from the file's real
tensor bytes (gguf-py's reader), that the llama.cpp adapter it writes is the adapter the
PEFT files describe (llama.cpp against transformers + PEFT), so the peers are measured on
the same LoRA maths, that its X-LoRA checkpoint is the reference layout over the bench
adapters, and that making the cached model is serialised by its lock.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from qadapt.bench import BenchSettings, run_bench
from qadapt.bench.engines import LlamaCppEngine
from qadapt.bench.make import bench_folder, make_bench_files, random_state_dict, xlora_names
from qadapt.bench.spec import LORA_TARGETS, QUICK, XLORA_EXPERTS, ModelShape
from qadapt.cache import file_lock
from qadapt.errors import InputError

#: the report's schema: what CI and docs/bench read
TOP_KEYS = {"machine", "bandwidth_gbs", "results"}
ROW_KEYS = {"engine", "format", "mode", "adapters", "metric", "median", "min", "max", "runs"}
#: the smoke run's model: the bench's architecture, small enough that making and running it takes seconds
TINY = ModelShape("llama-tiny", 64, 2, 128, 512, 4, 2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def quick_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    settings = BenchSettings(out=out, cache=cache, model=TINY, engines=("qadapt",), formats=("Q4_0",),
                             modes=("inplace", "q8"), runs=2, warmup=0, decode_tokens=4, prompt_tokens=16, batch=2,
                             probe_gib=0.125, probe_repeats=2)
    return settings, run_bench(settings)


def test_quick_smoke_writes_json_md_png(quick_run):
    """End to end on a tiny model (qadapt only): the JSON schema, every metric present with median
    within [min, max], the X-LoRA decode rows, the markdown with its summary, and the chart."""
    settings, report = quick_run
    data = json.loads((settings.out / "bench.json").read_text())
    assert set(data) >= TOP_KEYS and data["bandwidth_gbs"] > 0 and isinstance(data["machine"], dict)
    assert data["skipped"] == []
    for r in data["results"]:
        assert set(r) >= ROW_KEYS, r
        assert r["min"] <= r["median"] <= r["max"] and r["runs"] >= 1
    rows = [r for r in data["results"] if r["engine"] == "qadapt"]
    assert {r["format"] for r in rows} == {"Q4_0"} and {r["mode"] for r in rows} == {"inplace", "q8"}
    got = {(r["metric"], r["adapters"]) for r in rows if r["mode"] == "inplace"}
    assert {(r["metric"], r["adapters"]) for r in rows if r["mode"] == "q8"} >= {
        ("decode_tps", 0), ("decode_tps", 1), ("batched_tps", 2), ("batched_over_single", 2), ("batched_tps", 1),
        ("batched_over_single", 1), ("rss_over_files", 8),
        ("adapter_load_ms", 1), ("rss_over_files_one_load", 8)}
    n = XLORA_EXPERTS
    assert got >= {("load_s", 0), ("prefill_tps", 0), ("decode_tps", 0), ("decode_tps", 1), ("decode_tps", 2),
                   ("switch_ms", 1), ("batched_tps", 2), ("peak_rss_mb", 8), ("decode_fraction_of_bound", 0),
                   ("xlora_decode_tps", n), ("xlora_nongranular_decode_tps", n), ("xlora_load_s", n),
                   ("xlora_prefill_tps", n), ("xlora_peak_rss_mb", n)}
    assert all(r["runs"] == 2 for r in rows if r["metric"].endswith("decode_tps"))
    md = (settings.out / "bench.md").read_text()
    assert "| Q4_0 | qadapt inplace |" in md and "bound" in md and "X-LoRA decode, granular" in md
    summary = (settings.out / "bench-summary.md").read_text()
    assert md.split("Details:")[0].strip().endswith(summary.strip())  # bench.md opens with the summary
    assert summary.count("\n| Q4_0 |") == 1 and "q8 / bound" in summary
    if importlib.util.find_spec("matplotlib"):
        assert (settings.out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_xlora_checkpoint_is_reference_layout(quick_run, cache):
    """The harness's X-LoRA folder, read by qadapt's reader (layout and classifier shapes checked
    there) and against the files: experts are byte copies of adapters a0.., the classifier's
    last layer has one row per (adapted module, expert), as PEFT counts modules."""
    from qadapt.adapters.xlora_checkpoint import read_xlora

    files = bench_folder(cache, TINY, 0)
    ckpt = read_xlora(files.xlora)
    assert ckpt.config.layout == "xlora" and ckpt.config.adapters == tuple(xlora_names())
    assert ckpt.config.layerwise_scalings and ckpt.classifier_layers == TINY.num_hidden_layers * len(LORA_TARGETS)
    for k, name in enumerate(xlora_names()):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            assert (files.xlora / name / f).read_bytes() == (files.adapter(k) / f).read_bytes()


def test_make_waits_for_the_cache_lock(tmp_path):
    """While another process holds the folder's lock, make_bench_files waits and writes nothing."""
    files = bench_folder(tmp_path, TINY, 0)
    done = threading.Event()
    with file_lock(tmp_path, files.folder.name):
        t = threading.Thread(target=lambda: (make_bench_files(tmp_path, TINY, ("Q4_0",)), done.set()))
        t.start()
        time.sleep(0.5)
        assert not done.is_set() and not files.folder.exists()
    t.join(timeout=120)
    assert done.is_set() and files.gguf("Q4_0").exists() and files.lora_gguf(0).exists()


def test_refuses_to_overwrite_without_force(quick_run):
    settings, _ = quick_run
    with pytest.raises(InputError, match="--force"):
        replace(settings, force=False).validate()
    replace(settings, force=True).validate()


def test_bound_uses_gguf_py_tensor_bytes(quick_run, cache):
    """Reference: gguf-py's reader. Bytes per token = all tensor bytes - embedding table + one embedding row."""
    import gguf

    settings, report = quick_run
    files = make_bench_files(cache, TINY, ("Q4_0",))
    reader = gguf.GGUFReader(files.gguf("Q4_0"))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = total - int(emb.n_bytes) + int(emb.n_bytes) // TINY.vocab_size
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


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_batch_runs_each_row_as_its_own_sequence(cache):
    """The peer's batched figure ("8 rows x 1 shared adapter") measures real separate sequences: each row's
    greedy tokens from the one-context batch equal llama.cpp's own one-sequence decode of that prompt.

    Reference: llama.cpp itself, one sequence at a time, same adapter. The comparison is of argmax tokens,
    which only a mixed-up batch (rows reading each other's cache, or positions off by one) would change; a
    tie between two logits within llama.cpp's batch-size-dependent rounding is not expected on random
    weights over 6 tokens. Rows on different adapters are refused (Unsupported), as llama.cpp has one set."""
    from qadapt.bench.engines import Unsupported
    from qadapt.bench.worker import prompt_ids

    files = make_bench_files(cache, QUICK, ("F16",))
    eng = LlamaCppEngine(files.gguf("F16"), threads=2, n_ctx=64)
    eng.load()
    try:
        eng.add_adapter("a0", files.adapter(0), files.lora_gguf(0))
        eng.add_adapter("a1", files.adapter(1), files.lora_gguf(1))
        prompts = [prompt_ids(QUICK.vocab_size, 8, 1 + r) for r in range(3)]
        _, rows = eng.batched_tokens(prompts, 5, ["a0"] * 3)
        for p, got in zip(prompts, rows):
            eng._set(["a0"])
            eng.llm.reset()
            eng.llm.eval(p)
            want = [eng._logits()]
            for _ in range(5):
                eng.llm.eval([want[-1]])
                want.append(eng._logits())
            assert got == want
        with pytest.raises(Unsupported, match="one adapter set"):
            eng.batched(prompts, 2, ["a0", "a1", "a0"])
    finally:
        eng.unload()


def test_real_size_mode_on_tiny_shapes(tmp_path):
    """``--real-size``'s measurement (qadapt/bench/big.py) end to end on tiny files of both architectures: each
    engine in its own process, LoRA and base rates, resident memory; a peer that is not installed is an error
    row, not a failure."""
    from qadapt.bench.big import markdown, measure

    for shape in ("tiny", "tiny-qwen3"):
        r = measure(tmp_path, "Q8_0", shape=shape, prompt=16, tokens=4, engines=("qadapt", "llama.cpp"),
                    adapter_dtype="bfloat16")
        q = r["rows"][0]
        assert q["engine"] == "qadapt" and q["decode_tps_lora"] > 0 and q["prefill_tps_base"] > 0
        assert 0 < q["rss_added_bytes"] < 400e6
        assert r["bytes_per_token"] > 0.9 * r["file_bytes"] * (1 if shape == "tiny-qwen3" else 0.5)
        assert "| qadapt |" in markdown(r)


def test_bench_options_that_would_be_ignored_are_refused():
    """--real-shape without --real-size, --adapter-dtype with a measurement that does not use the benchmark's
    adapters: a usage error naming the option, not a run that silently ignores it."""
    from click.testing import CliRunner

    from qadapt.cli import main

    r = CliRunner().invoke(main, ["bench", "--real-shape", "qwen3-4b"])
    assert r.exit_code == 2 and "--real-shape applies to --real-size only" in r.output
    r = CliRunner().invoke(main, ["bench", "--moe", "Q8_0", "--adapter-dtype", "bfloat16"])
    assert r.exit_code == 2 and "--adapter-dtype" in r.output and "--moe" in r.output
