"""The device path on CPU: qadapt's Triton kernels under Triton's interpreter, and the model run through them.

References: gguf-py's dequantization (``gguf.quants.dequantize``) for the GGUF block kernels; a plain
per-row loop (``y[m] += scale * Bt.T @ (A @ x[m])``) for the gathered LoRA kernels; for whole models,
qadapt's ``kernels="exact"`` CPU path (itself checked against transformers on gguf-py's weights and
PEFT in tests/test_gguf_runtime.py, test_lora.py and test_architectures.py).

Tolerances, from the error model of each path:
- dequantization: 0 (the kernels do gguf-py's float32 operations in gguf-py's order);
- float32 matmuls: 1e-5 of the output's scale (float32 accumulation over <= 512 terms in a different
  order: a few ulps of the largest partial sums);
- the float16 tensor-core matmul: each product's factors are rounded to float16 (relative 2^-11 each), so
  ``|err| <= 2^-10 * sum_k |x_k w_k|`` per output, checked against that bound computed from the data;
- whole models: 1e-5 of the logit scale, as the exact path's own contract (the measured worst case here
  is 2.6e-6, Q6_K).

On a machine with CUDA the device tests at the end run too (``device="cuda"`` against the CPU's exact
path); without it they skip. ``tools/gpu_check.py`` is the prepared GPU run.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import numpy as np  # noqa: E402
from gguf import GGMLQuantizationType, quants  # noqa: E402

from device_marks import cuda, interpreter  # noqa: E402
import qadapt  # noqa: E402
from models import random_blocks, tiny_arch, tiny_hf, write_quantized  # noqa: E402
from server_helpers import write_peft_adapter  # noqa: E402

from qadapt.errors import UnsupportedError  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"]


def _blocks(qtype: str, rows: int, cols: int, seed: int = 0):
    blocks = random_blocks(qtype, rows, cols, np.random.default_rng(seed))
    raw = torch.from_numpy(np.ascontiguousarray(blocks)).reshape(rows, -1)
    ref = quants.dequantize(np.asarray(blocks).reshape(rows, -1), GGMLQuantizationType[qtype])
    return raw, torch.from_numpy(ref.astype(np.float32)).reshape(rows, cols)


@interpreter
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_kernels_match_gguf_py(qtype):
    from qadapt.quant.triton import ggml as tg

    raw, w = _blocks(qtype, 40, 512)  # 40 rows: not a multiple of the kernels' 64-row tiles
    assert torch.equal(tg.dequantize(raw, qtype, 512), w)
    g = torch.Generator().manual_seed(1)
    w64 = w.double()
    for m in (1, 3, 21):  # GEMV (decode), GEMV with several rows, the tiled kernel with a partial row tile
        x = torch.randn(m, 512, generator=g)
        want = (x.double() @ w64.T)
        got = tg.matmul(x, raw, qtype, 512, exact=True).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (qtype, m)
        if m > tg.GEMV_MAX_ROWS:  # the float16 tensor-core path
            fast = tg.matmul(x, raw, qtype, 512).double()
            bound = 2.0 ** -10 * (x.double().abs() @ w64.abs().T) * 1.01 + 1e-6
            assert ((fast - want).abs() <= bound).all(), qtype


@interpreter
def test_gguf_kernels_check_their_inputs():
    from qadapt.quant.triton import ggml as tg

    raw, _ = _blocks("Q4_K", 4, 256)
    with pytest.raises(ValueError, match="IQ2_XXS"):
        tg.matmul(torch.zeros(1, 256), raw, "IQ2_XXS", 256)
    with pytest.raises(ValueError, match="uint8"):
        tg.matmul(torch.zeros(1, 512), raw, "Q4_K", 512)
    with pytest.raises(ValueError, match="whole blocks"):
        tg.matmul(torch.zeros(1, 100), raw, "Q4_K", 100)
    with pytest.raises(ValueError, match=r"\[M, 256\]"):
        tg.matmul(torch.zeros(1, 128), raw, "Q4_K", 256)


@interpreter
def test_bgmv_matches_a_per_row_loop():
    from qadapt.adapters.slots import bgmv_reference
    from qadapt.quant.triton.bgmv import bgmv

    g = torch.Generator().manual_seed(0)
    S, R, K, N, M = 5, 12, 96, 80, 9
    a, bt = torch.randn(S, R, K, generator=g), torch.randn(S, R, N, generator=g)
    scale = torch.rand(S, generator=g)
    idx = torch.tensor([0, 3, -1, 3, 4, 1, 1, -1, 2], dtype=torch.int32)
    x, y0 = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    want = y0.clone().double()
    for m in range(M):
        s = int(idx[m])
        if s >= 0:
            want[m] += float(scale[s]) * (bt[s].double().T @ (a[s].double() @ x[m].double()))
    for fn in (bgmv, bgmv_reference):
        got = fn(x, y0.clone(), a, bt, scale, idx).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), fn.__name__
        assert torch.equal(got[2], y0[2].double())  # rows without a slot untouched
    with pytest.raises(ValueError, match="slot indices"):
        bgmv(x, y0.clone(), a, bt, scale, torch.full((M,), S, dtype=torch.int32))
    with pytest.raises(ValueError, match="x must be"):
        bgmv(x[:, :10], y0.clone(), a, bt, scale, idx)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton")
    out = {}
    for name, hf, qtype in (("q8", tiny_hf("llama", seed=3), "Q8_0"), ("q4k", tiny_arch("llama", seed=3, wide=True),
                                                                       "Q4_K")):
        write_quantized(hf, d / f"{name}.gguf", qtype, seed=4)
        ads = {n: str(write_peft_adapter(hf, d / name / n, 10 + i)) for i, n in enumerate("abc")}
        out[name] = (d / f"{name}.gguf", ads)
    return out


@interpreter
@pytest.mark.parametrize("which", ["q8", "q4k"])
def test_model_on_the_triton_path_matches_exact(models, which):
    """The whole model through the device path (GGUF kernels, adapters in slots, per-row mixes, a decode
    step) against the exact CPU path, logits within 1e-5 of their scale."""
    path, ads = models[which]
    ref = qadapt.load(path, kernels="exact", adapters=ads, activate=[])
    tri = qadapt.load(path, kernels="triton", adapters=ads, activate=[])
    from qadapt.quant.ggml import GGMLLinear

    assert tri._slots is not None
    assert {m.path for m in tri.decoder.modules() if isinstance(m, GGMLLinear)} == {"triton"}
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    for act in ([], ["a", "b"]):
        ref.activate_adapters(act)
        tri.activate_adapters(act)
        want = ref.logits(ids)
        assert (tri.logits(ids) - want).abs().max() <= 1e-5 * want.abs().max(), act
    rows = (("a",), ("b",), (), ("a", "c"))
    x = torch.randint(0, 200, (4, 5), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5).expand(4, 5)
    c1, c2 = ref.new_cache(16, 4), tri.new_cache(16, 4)
    for step in range(2):
        want, got = ref.step(x, pos, c1, rows=rows), tri.step(x, pos, c2, rows=rows)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), step
        x, pos = want.argmax(-1, keepdim=True), torch.full((4, 1), 5 + step)
    assert tri._slots.swaps == 3  # a, b, c: each copied into a slot once


@interpreter
def test_slots_swap_by_lru_and_refuse_an_overfull_batch(models):
    path, ads = models["q8"]
    ref = qadapt.load(path, kernels="exact", adapters=ads, activate=[])
    tri = qadapt.load(path, kernels="triton", adapters=ads, activate=[], max_slots=2)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    for name in ("a", "b", "c", "a", "c"):  # c evicts a (least recent), a then evicts b
        ref.activate_adapters([name])
        tri.activate_adapters([name])
        want = ref.logits(ids)
        assert (tri.logits(ids) - want).abs().max() <= 1e-5 * want.abs().max(), name
    assert tri._slots.swaps == 4  # a, b, c, a again; the last c was still in its slot
    with pytest.raises(UnsupportedError, match="3 distinct adapters.*2 device slots"):
        tri.step(torch.ones(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long), tri.new_cache(4, 3),
                 rows=(("a",), ("b",), ("c",)))


@interpreter
@pytest.mark.parametrize("name", ["4bit-actorder-asym-v1", "4bit-sym-v2", "8bit", "2bit"])
def test_gptq_kernel_matches_the_gptq_formula(name):
    """The GPTQ Triton kernel on the packed codes (act-order gathered through g_idx, v1 zeros) against GPTQ's
    ``scales[g_idx] * (q - zeros[g_idx])`` on codes packed by GPTQ's own pack formulas (tests/test_gptq.py's
    reference packers), in float64: float32 accumulation over <= 240 terms, 1e-5 of the output's scale.
    K = 200 (one group) is not a multiple of the 32-row tiles (the tail is masked); 3-bit codes are refused
    by name."""
    from test_gptq import CONFIGS, gptq_tensors

    from qadapt.quant.gptq import GPTQLinear
    from qadapt.quant.triton.gptq import matmul

    bits, group, sym, act, fmt = CONFIGS.get(name, (2, 40, False, True, "gptq"))
    gen = torch.Generator().manual_seed(7)
    K = 200 if group == -1 else 240 if bits == 2 else 224  # whole groups; one group: a masked K tail
    w = torch.randn(80, K, generator=gen)
    t, ref, _ = gptq_tensors(w, bits, group, sym, act, fmt)
    layer = GPTQLinear(**t, bits=bits, group_size=group, checkpoint_format=fmt)
    for rows in (1, 3, 5):  # the decode form (one row per program), then a tile
        x = torch.randn(rows, K, generator=gen)
        want = x.double() @ ref.double().T
        got = matmul(x, layer.qweight, layer.zeros, layer.scales, layer.g_idx, bits, exact=True).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), rows
    layer.use_triton()
    assert layer.path == "triton" and layer.int4_packed is None
    assert (layer(x.unsqueeze(0)).double()[0] - want).abs().max() <= 1e-5 * want.abs().max()
    t3, _, _ = gptq_tensors(torch.randn(96, 224, generator=gen), 3, 32, False, False, "gptq")
    with pytest.raises(UnsupportedError, match="3-bit GPTQ.*mode='dequantize'"):
        GPTQLinear(**t3, bits=3, group_size=32, checkpoint_format="gptq", name="blk").use_triton()


@interpreter
def test_gptq_model_on_the_triton_path_matches_exact(tmp_path):
    """A GPTQ 4-bit act-order checkpoint loaded with kernels="triton" (the device path on the CPU interpreter:
    its linears on the Triton GPTQ kernel, adapters in slots) against the CPU path's logits, with and without a
    LoRA: 1e-5 of the logit scale (the CPU path's blockwise float32 maths; its int4 kernel is avoided by
    comparing with mode="dequantize", exact float32 of the same weights)."""
    from test_gptq import write_gptq_folder

    from qadapt.quant.gptq import GPTQLinear

    hf = tiny_hf("llama", seed=1)
    write_gptq_folder(hf, tmp_path / "g", "4bit-actorder-asym-v1")
    ads = {"a": str(write_peft_adapter(hf, tmp_path / "a", 3))}
    ref = qadapt.load(tmp_path / "g", mode="dequantize", adapters=ads, activate=[])
    tri = qadapt.load(tmp_path / "g", kernels="triton", adapters=ads, activate=[])
    assert {m.path for m in tri.decoder.modules() if isinstance(m, GPTQLinear)} == {"triton"}
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    for act in ([], ["a"]):
        ref.activate_adapters(act)
        tri.activate_adapters(act)
        want = ref.logits(ids)
        assert (tri.logits(ids) - want).abs().max() <= 1e-5 * want.abs().max(), act


def test_cuda_without_a_gpu_is_refused_by_name(models):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UnsupportedError, match="no CUDA device"):
        qadapt.load(models["q8"][0], device="cuda")


def test_triton_on_cpu_without_the_interpreter_is_refused(models):
    code = ("import qadapt\ntry:\n    qadapt.load(%r, kernels='triton')\nexcept qadapt.errors.UnsupportedError as e:\n"
            "    print(e)\n") % str(models["q8"][0])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


# ------------------------------------------------------------------------------------------ on a GPU


@cuda
@pytest.mark.parametrize("which", ["q8", "q4k"])
def test_cuda_model_matches_the_cpu(models, which):
    """On the GPU: the float16 tensor-core prefill and the float32 GEMV decode against the CPU's exact path;
    tolerance 2e-3 of the logit scale (float16 rounding of activations and weights, 2^-10 relative per
    product, over a 2-layer model)."""
    path, ads = models[which]
    ref = qadapt.load(path, kernels="exact", adapters=ads, activate=["a"])
    gpu = qadapt.load(path, device="cuda", adapters=ads, activate=["a"])
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    want = ref.logits(ids)
    assert (gpu.logits(ids) - want).abs().max() <= 2e-3 * want.abs().max()
    rows = (("a",), ("b",), (), ("a", "c"))
    x, pos = torch.randint(0, 200, (4, 5)), torch.arange(5).expand(4, 5)
    want = ref.step(x, pos, ref.new_cache(8, 4), rows=rows)
    got = gpu.step(x, pos, gpu.new_cache(8, 4), rows=rows)
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()
    assert ref.generate("hello", max_new_tokens=6) == gpu.generate("hello", max_new_tokens=6)
