"""GGUF files quantized by llama.cpp itself (tests/data/llama_cpp_quant, made by tools/llama_quant_fixtures.py:
llama.cpp's converter, then its ``llama_model_quantize``) and llama.cpp's greedy tokens on them.

The model has Llama 3.1 8B's configuration (tests/real_configs.py; rope_freqs, q/k row order), shrunk to
hidden 256 so its rows are whole K-quant super-blocks; llama.cpp's Q4_K_M and Q5_K_M mix types per tensor.
References: transformers' modeling code on gguf-py's dequantization of each file, and llama.cpp's greedy
tokens, recorded by llama-cpp-python 0.3.36.

Tolerances. Logits against transformers, exact kernels: 1e-4 (float32 on the same weights, summation order
only), except where a Q4_0 / Q4_K tensor takes torch's int4 kernel, whose activations are bfloat16 (a relative
rounding of 2^-9 per input; measured 1.4% of the logit scale here): 3% of the scale. Greedy tokens against
llama.cpp: qadapt (kernels="q8") and llama.cpp round activations differently (llama.cpp: Q8_K blocks of 256 for
K-quants, an f16 KV cache); measured, their logits differ by at most 1.8% of the logit scale. Each of
llama.cpp's tokens, teacher-forced, must be qadapt's argmax or within 4% of the scale of it (2x the measured
difference): a near tie may go either way, a wrong model does not stay within it for 48 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qadapt
from real_configs import dequantized_model

DATA = Path(__file__).parent / "data" / "llama_cpp_quant"
EXPECTED = json.loads((DATA / "expected.json").read_text())
TYPES = sorted(EXPECTED["greedy"])
IDS = torch.tensor([[1, 17, 250, 31, 77, 5, 299, 120, 64, 3] * 3])
INT4_KERNEL = {"Q4_0", "Q4_K_M"}  # files with tensors on torch's int4 kernel (bf16 activations) in exact mode


@pytest.fixture(scope="module")
def transformers_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((DATA / "config.json").read_text())
    cfg.pop("architectures", None)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).float().eval()


@pytest.mark.parametrize("qtype", TYPES)
def test_llama_cpp_quantized_file_matches_transformers(transformers_model, qtype):
    path = DATA / f"model.{qtype}.gguf"
    ref = dequantized_model(transformers_model, path, "LLAMA")
    with torch.no_grad():
        want = ref(IDS).logits
    got = qadapt.load(path).logits(IDS)
    if qtype in INT4_KERNEL:
        scale = want.abs().amax(-1, keepdim=True)
        assert ((got - want).abs() <= 0.03 * scale).all(), float(((got - want).abs() / scale).max())
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("qtype", TYPES)
def test_greedy_tokens_agree_with_llama_cpp(qtype):
    m = qadapt.load(DATA / f"model.{qtype}.gguf", kernels="q8")
    equal = steps = 0
    for prompt, want in zip(EXPECTED["prompts"], EXPECTED["greedy"][qtype]):
        logits = m.logits(torch.tensor([prompt + want]))[0, len(prompt) - 1:-1]
        for t, row in zip(want, logits):
            gap = float(row.max() - row[t])
            assert gap <= 0.04 * float(row.abs().max()), (qtype, prompt, t, gap)
            equal += gap == 0
            steps += 1
    assert equal >= 0.9 * steps, (qtype, equal, steps)  # near ties are rare: most steps agree exactly
