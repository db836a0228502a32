"""Write the K-quant files llama.cpp makes, and its greedy tokens, for the tests that run without it.

    pip install -e ".[bench]"        # llama-cpp-python 0.3.36 (its quantizer and runtime)
    python tools/llama_quant_fixtures.py [--out tests/data/llama_cpp_quant] [--force]

A small random model with Llama 3.1 8B's configuration (tests/real_configs.py: hidden 256 so that every row is
whole 256-value K-quant super-blocks; its output head scaled up so that greedy choices are decisive) goes through llama.cpp's own tools: convert_hf_to_gguf.py (F32), then
``llama_model_quantize`` to Q4_0, Q4_K_M, Q5_K_M and Q6_K. For each file, llama.cpp's greedy tokens from
three prompts (its own decode loop: one ``llama_decode`` for the prompt, then one per token, argmax) are
recorded in expected.json. tests/test_llama_cpp_quant.py checks qadapt on those files: logits against
transformers on gguf-py's dequantization, greedy tokens against llama.cpp's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

NAME = "llama-3.1-8b"
SIZES = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
PROMPTS = [[1, 17, 250, 31, 77, 5, 299, 120], [1, 64, 3, 3, 200, 11], [1, 270, 268, 259, 279, 261, 272, 9, 9, 9]]
N_NEW = 16


def greedy(path: Path) -> list[list[int]]:
    from qadapt.bench.engines import LlamaCppEngine

    eng = LlamaCppEngine(path, threads=2, n_ctx=64)
    eng.load()
    try:
        out = []
        for prompt in PROMPTS:
            eng.llm.reset()
            eng.llm.eval(prompt)
            toks = [eng._logits()]
            for _ in range(N_NEW - 1):
                eng.llm.eval([toks[-1]])
                toks.append(eng._logits())
            out.append(toks)
        return out
    finally:
        eng.unload()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "llama_cpp_quant")
    ap.add_argument("--force", action="store_true", help="replace --out")
    args = ap.parse_args()
    import llama_cpp
    from llama_sdist import sdist_root
    from real_configs import build, convert, save

    from qadapt.bench.make import quantize_llama_cpp
    from qadapt.io import atomic_dir, write_json

    root = sdist_root(ROOT / ".pytest_cache" / "d" / "llama-sdist")
    quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(quiet, None)
    cfg, hf = build(NAME, seed=3, **SIZES)
    with torch.no_grad():  # logits spread over about +-8 (random init gives +-1): greedy choices are decisive
        hf.lm_head.weight.mul_(8.0)
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(args.out, force=args.force) as out:
        folder = save(hf, cfg, Path(tmp) / NAME)
        f32 = Path(tmp) / "model.F32.gguf"
        convert(root, [(folder, f32, "f32")])
        expected = {"llama_cpp_python": llama_cpp.__version__, "model": NAME, "prompts": PROMPTS, "greedy": {}}
        for t in TYPES:
            quantize_llama_cpp(f32, out / f"model.{t}.gguf", t, threads=2)
            expected["greedy"][t] = greedy(out / f"model.{t}.gguf")
            print(t, (out / f"model.{t}.gguf").stat().st_size, file=sys.stderr)
        shutil.copy(folder / "config.json", out / "config.json")
        write_json(out / "expected.json", expected)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
