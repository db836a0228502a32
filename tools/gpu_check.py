#!/usr/bin/env python
"""The prepared GPU run: qadapt's CUDA tests, then decode speed on a Llama-3-8B-shaped model against the HBM bound.

Made for a machine with one NVIDIA GPU, torch (CUDA), Triton, transformers and PEFT, and no package index:
what else it needs travels as wheels made here first (``--prepare``). In order:

1. installs the carried wheels (gguf, pytest, httpx, the server's packages and the OpenAI client, and their
   dependencies; bitsandbytes without its dependencies, torch being there) with ``--no-index``;
2. runs the GPU tests (``pytest tests/test_triton.py tests/test_triton_bnb.py tests/test_graphs.py`` and the
   device cases of tests/test_peft_features.py: the kernels, ``device="cuda"`` models against the CPU's exact /
   dequantized path, CUDA graphs against eager steps, every PEFT adapter kind, X-LoRA and every family on the
   GPU against PEFT, ``qadapt serve --device cuda`` batching clients on different adapters; the MoE device test
   needs llama.cpp's converter, 77 MB, not carried);
3. measures the copy bandwidth (a device-to-device copy of 4 GiB: read + write bytes over time);
4. writes a random Llama-3-8B-shaped GGUF per type (Q4_0, Q8_0, Q4_K_M; random blocks with small scales:
   the bytes a real file has, no quantization run) and measures batch-1 decode tokens/s with one rank-16
   LoRA on q/k/v/o through ``qadapt.load(path, device="cuda")`` (CUDA graphs on, then the same steps eagerly),
   against the bound (weight bytes read per token over the measured bandwidth) and against transformers + PEFT
   in bf16 on the same GPU;
5. aggregate decode tokens/s for 64 sequences on 64 different adapters and on one shared adapter.
6. the same for a random GPTQ 4-bit checkpoint of that shape (group 128), in place on the Triton GPTQ kernel;
7. the same for a random bitsandbytes nf4 checkpoint of that shape (blocksize 64, no double quantization),
   in place on bitsandbytes' own CUDA kernels (the default there), then batch-1 decode on qadapt's Triton
   kernel over the same bytes (its load includes bitsandbytes' CPU repack and its undoing).

On the lent machine (10 minutes a command, 15 in all) run it in parts, each with its own ``--out``:
``--only-tests``; then ``--no-tests --types Q4_0,Q4_K_M --no-gptq --no-nf4``; then ``--no-tests --types Q8_0
--no-hf``; then ``--no-tests --types "" --no-hf`` (GPTQ and nf4).

Examples::

    python tools/gpu_check.py --prepare .gpu/wheels            # here, with an index: the wheels to carry
    python tools/gpu_check.py --wheels .gpu/wheels --out $OUT/gpu  # on the GPU machine
    TRITON_INTERPRET=1 python tools/gpu_check.py --tiny --device cpu --out /tmp/gpu  # the script itself, on CPU

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``; exit status 0 when the tests passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WHEELS = ["gguf==0.19.0", "pytest>=8", "httpx>=0.27", "pyyaml", "click>=8.1", "jinja2>=3.1.6", "tqdm>=4.66",
          "starlette>=0.40", "uvicorn>=0.30", "pydantic>=2.5", "llguidance>=1.9.1", "openai>=1.0"]  # + the server
ON_DEVICE = {"numpy", "torch", "triton", "transformers", "peft", "safetensors"}
NO_DEPS = ["bitsandbytes==0.50.2"]  # its dependencies (torch, numpy) are on the GPU machine: not carried

def prepare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(folder), *WHEELS], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder), *NO_DEPS],
                   check=True)
    for w in folder.glob("*.whl"):  # the GPU machine has these (torch's and transformers' own): not carried
        if w.name.split("-")[0].lower() in ON_DEVICE:
            w.unlink()
    size = sum(w.stat().st_size for w in folder.glob("*.whl"))
    print(f"wheels in {folder}: {len(list(folder.glob('*.whl')))}, {size / 2**20:.0f} MiB; carry it to the GPU machine")


def install(folder: Path) -> None:
    """Each carried package not importable yet, alone (a wheel for another Python fails alone)."""
    import importlib.util

    for w in WHEELS + NO_DEPS:
        name = w.split("=")[0].split(">")[0]
        if importlib.util.find_spec({"pyyaml": "yaml"}.get(name, name)) is None:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(folder),
                            name], check=False)


def bandwidth(device: str) -> float:
    import torch

    n = (4 << 30) // 4 if device == "cuda" else (64 << 20) // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / min(times)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def decode_tps(model, batch: int, rows, tokens: int, device: str) -> float:
    import torch

    cache = model.new_cache(16 + tokens + 2, batch)
    ids = torch.randint(0, 200, (batch, 16))
    model.step(ids, torch.arange(16).expand(batch, 16), cache, rows=rows)
    tok = torch.randint(0, 200, (batch, 1))
    model.step(tok, torch.full((batch, 1), 16), cache, rows=rows)  # untimed: a CUDA graph's capture
    _sync(device)
    t = time.perf_counter()
    for s in range(tokens):
        model.step(tok, torch.full((batch, 1), 17 + s), cache, rows=rows)
    _sync(device)
    return batch * tokens / (time.perf_counter() - t)


def hf_peft_tps(shape: dict, adapter: Path, tokens: int, device: str) -> float:
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["ff"], num_hidden_layers=shape["layers"],
                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                      vocab_size=shape["vocab"], rope_theta=shape["rope_theta"], torch_dtype="bfloat16")
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m = PeftModel.from_pretrained(m, str(adapter)).eval()
    ids = torch.randint(0, 200, (1, 16), device=device)
    with torch.inference_mode():
        m.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        _sync(device)
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        _sync(device)
    return tokens / (time.perf_counter() - t)


def measure_model(path: Path, a, adapters: dict, bw: float, read: int, write_s: float) -> dict:
    """Batch-1 decode with one LoRA against the bound, then ``a.rows`` rows on as many adapters and on one;
    a failure is a finding: recorded in the run, the other models still run."""
    import qadapt

    run: dict = {"bytes_per_token": read, "write_s": write_s}
    try:
        m = qadapt.load(path, device=a.device, kernels="triton", adapters={"a0": adapters["a0"]}, activate=["a0"],
                        max_slots=64)
        run["decode_tps_1_lora"] = decode_tps(m, 1, None, a.tokens, a.device)
        graphs, m._graphs = m._graphs, None  # the same steps without CUDA graphs: what capturing them gains
        run["decode_tps_1_lora_eager"] = decode_tps(m, 1, None, a.tokens, a.device)
        m._graphs = graphs
        if graphs is not None:
            run["graph_replays"], run["graphs_off"] = graphs.replays, graphs.off
        run["bound_tps"] = bw / read
        run["fraction_of_bound"] = run["decode_tps_1_lora"] / run["bound_tps"]
        for k in range(1, a.rows):
            m.load_adapter(f"a{k}", adapters[f"a{k}"])
        steps = max(2, a.tokens // 4)
        run["tps_64_rows_64_adapters"] = decode_tps(m, a.rows, tuple((f"a{k}",) for k in range(a.rows)), steps,
                                                    a.device)
        run["tps_64_rows_1_adapter"] = decode_tps(m, a.rows, (("a0",),) * a.rows, steps, a.device)
        run["ratio_64_vs_1"] = run["tps_64_rows_64_adapters"] / run["tps_64_rows_1_adapter"]
    except Exception as e:  # noqa: BLE001
        run["error"] = f"{type(e).__name__}: {e}"
    return run


def gptq_run(a, shape: dict, adapters: dict, bw: float) -> dict:
    """Batch-1 decode with one LoRA and the 64-row batches on a random GPTQ 4-bit checkpoint, in place."""
    import shutil

    from qadapt.bench.random_hf import write_gptq_model

    folder = a.out / "models" / "gptq-4bit"
    t = time.perf_counter()
    read = write_gptq_model(folder, shape, bits=4, group=128 if not a.tiny else 32)
    run = measure_model(folder, a, adapters, bw, read, time.perf_counter() - t)
    shutil.rmtree(folder, ignore_errors=True)
    print("gptq-4bit", json.dumps(run), flush=True)
    return run


def nf4_run(a, shape: dict, adapters: dict, bw: float) -> dict:
    """The same on a random bitsandbytes nf4 checkpoint, in place (without bitsandbytes: the run's error)."""
    import shutil

    folder = a.out / "models" / "nf4"
    t = time.perf_counter()
    try:
        from qadapt.bench.random_hf import write_nf4_model

        read = write_nf4_model(folder, shape)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    run = measure_model(folder, a, adapters, bw, read, time.perf_counter() - t)  # bitsandbytes' own kernels
    os.environ["QADAPT_BNB_KERNEL"] = "triton"  # then qadapt's Triton kernel on the same bytes, batch-1 decode
    try:
        import qadapt

        m = qadapt.load(folder, device=a.device, kernels="triton", adapters={"a0": adapters["a0"]},
                        activate=["a0"])
        run["triton_kernel_decode_tps_1_lora"] = decode_tps(m, 1, None, a.tokens, a.device)
        del m
    except Exception as e:  # noqa: BLE001
        run["triton_kernel_error"] = f"{type(e).__name__}: {e}"
    finally:
        del os.environ["QADAPT_BNB_KERNEL"]
    shutil.rmtree(folder, ignore_errors=True)
    print("nf4", json.dumps(run), flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples::")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", type=Path, help="download the wheels to carry into this folder, then exit")
    p.add_argument("--wheels", type=Path, help="install these carried wheels first (no index)")
    p.add_argument("--out", type=Path, required=False, default=Path("gpu-check"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model instead of the 8B shape (a dry run)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M")
    p.add_argument("--rows", type=int, default=64, help="sequences (each on its own adapter) in the batched run")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-gptq", action="store_true", help="skip the GPTQ 4-bit run")
    p.add_argument("--no-nf4", action="store_true", help="skip the bitsandbytes nf4 run")
    p.add_argument("--no-hf", action="store_true", help="skip transformers + PEFT in bf16")
    p.add_argument("--only-tests", action="store_true", help="run the GPU tests, then stop (no measurement)")
    a = p.parse_args(argv)
    if a.prepare:
        prepare(a.prepare)
        return 0
    if a.wheels:
        install(a.wheels)
    # the CPU kernels are not what this measures: no first-use compile of them on the GPU machine
    os.environ.setdefault("QADAPT_NATIVE", "0")
    sys.path.insert(0, str(ROOT))
    a.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"rows": a.rows, "device": a.device, "shape": "tiny" if a.tiny else "llama-3-8b", "runs": {}}
    ok = True
    if not a.no_tests:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton.py",
                            "tests/test_triton_bnb.py", "tests/test_graphs.py", "tests/test_peft_features.py", "tests/test_xlora.py",
                            "tests/test_architectures.py", "tests/test_server_device.py", "-k",
                            "cuda or triton or graph"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        report["tests"] = {"exit": r.returncode, "tail": r.stdout[-3000:] + r.stderr[-2000:]}
        ok = r.returncode == 0
        print(r.stdout[-1500:], flush=True)
    if a.only_tests:
        from qadapt.io import write_json

        write_json(a.out / "gpu_check.json", report, force=True)
        return 0 if ok else 1
    import torch

    from qadapt.bench.random_gguf import LLAMA3_8B, TINY, write_adapter, write_model

    shape = TINY if a.tiny else LLAMA3_8B
    bw = bandwidth(a.device)
    report["copy_bandwidth_GBps"] = bw / 1e9
    work = a.out / "models"
    work.mkdir(exist_ok=True)
    adapters = {f"a{k}": str(write_adapter(work / f"a{k}", shape, k)) for k in range(a.rows)}
    for qtype in [t for t in a.types.split(",") if t]:
        path = work / f"llama.{qtype}.gguf"
        t = time.perf_counter()
        read = write_model(path, shape, qtype)
        run = measure_model(path, a, adapters, bw, read, time.perf_counter() - t)
        ok = ok and "error" not in run
        path.unlink()
        report["runs"][qtype] = run
        print(qtype, json.dumps(run), flush=True)
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if not a.no_gptq:
        report["runs"]["gptq-4bit"] = gptq_run(a, shape, adapters, bw)
        ok = ok and "error" not in report["runs"]["gptq-4bit"]
    if not a.no_nf4:
        report["runs"]["nf4"] = nf4_run(a, shape, adapters, bw)
        ok = ok and "error" not in report["runs"]["nf4"]
        if a.device == "cuda":
            torch.cuda.empty_cache()
    try:
        report["transformers_peft_bf16_tps"] = (None if a.no_hf else
                                                 hf_peft_tps(shape, Path(adapters["a0"]), a.tokens, a.device))
    except Exception as e:
        report["transformers_peft_bf16_tps"] = f"{type(e).__name__}: {e}"
    from qadapt.io import atomic_write, write_json

    write_json(a.out / "gpu_check.json", report, force=True)
    lines = [f"GPU check on {a.device} ({report['shape']}): copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; "
             f"transformers + PEFT bf16: {report['transformers_peft_bf16_tps']}", "",
             f"| type | decode tok/s, 1 LoRA | without graphs | bound | fraction | {a.rows} rows x {a.rows} adapters "
             "| x 1 adapter | ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for qt, r in report["runs"].items():
        if "error" in r:
            lines.append(f"| {qt} | {r['error']} ||||||")
        else:
            lines.append(f"| {qt} | {r['decode_tps_1_lora']:.1f} | {r['decode_tps_1_lora_eager']:.1f} "
                         f"| {r['bound_tps']:.1f} | {r['fraction_of_bound']:.2f} "
                         f"| {r['tps_64_rows_64_adapters']:.0f} | {r['tps_64_rows_1_adapter']:.0f} | "
                         f"{r['ratio_64_vs_1']:.2f} |")
    atomic_write(a.out / "gpu_check.md", "\n".join(lines) + "\n", force=True)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
