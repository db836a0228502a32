"""bitsandbytes weights in place on the device path: the Triton kernel of qadapt/quant/triton/bnb.py under
Triton's interpreter, and bnb models run through it.

References: bitsandbytes' own CPU dequantization (``bitsandbytes.functional.dequantize_4bit``, nested absmax
included, and ``int8_vectorwise_dequant``) for the kernel; for whole models, the same checkpoint loaded with
``mode="dequantize"`` (DenseLinear on bitsandbytes' dequantized weights, exact float32 matmuls).

Tolerances, from the error model:
- the dequantized weight: 0 (``x = I``: the kernel's tile of code * absmax, the nested absmax and the
  rounding to the state's dtype are bitsandbytes' float32 operations; an identity product adds only zeros);
- float32 matmuls: 1e-5 of the output's scale (the kernel's float32 accumulation over <= 256 terms, in
  another order than the float64 reference: a few ulps of the largest partial sums);
- whole models: 1e-5 of the logit scale (each layer as above, against the dequantize-mode float32 path);
- on a GPU (float16 tiles on tensor cores): 2e-3 of the logit scale, as tests/test_triton.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install 'qadapt[bnb]')")

import bitsandbytes.functional as F  # noqa: E402

from device_marks import cuda, interpreter  # noqa: E402
import qadapt  # noqa: E402
from models import tiny_hf  # noqa: E402
from server_helpers import write_peft_adapter  # noqa: E402

from qadapt.errors import UnsupportedError  # noqa: E402
from qadapt.quant import bnb as bnb_mod  # noqa: E402
from qadapt.quant.bnb import BnbLinear  # noqa: E402



def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> float:
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= tol, err
    return err


@interpreter
@pytest.mark.parametrize("quant", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_4bit_kernel_matches_bitsandbytes_dequantize(quant, nested):
    """Blocksize 64 and 128; K = 200 / 168: neither a multiple of the kernel's 32-column tiles nor of the
    block (blocks run across rows in bitsandbytes' flat order); a bfloat16 weight (its dequantization is
    rounded to bfloat16). 40 outputs: a partial 64-wide tile."""
    from qadapt.quant.triton.bnb import matmul_4bit

    g = torch.Generator().manual_seed(0)
    for blocksize, K, dtype in ((64, 200, torch.float32), (128, 168, torch.float32), (64, 192, torch.bfloat16)):
        w = torch.randn(40, K, generator=g).to(dtype)
        q, st = F.quantize_4bit(w, quant_type=quant, blocksize=blocksize, compress_statistics=nested)
        assert st.nested == nested and (st.state2 is not None) == nested and st.dtype == dtype
        if nested:
            assert st.absmax.dtype == torch.uint8 and st.state2.code.numel() == 256
        ref = F.dequantize_4bit(q, st).float()
        kw = dict(absmax2=st.state2.absmax, code2=st.state2.code, offset=st.offset) if nested else {}
        run = lambda x: matmul_4bit(x, q, st.absmax, st.code, blocksize, (40, K), dtype=dtype, exact=True,  # noqa: E731
                                    blocksize2=st.state2.blocksize if nested else 256, **kw)
        assert torch.equal(run(torch.eye(K)), ref.T), (blocksize, dtype)
        for rows in (1, 3, 21):  # the decode form (one row per program), then tiles, the second partial
            x = torch.randn(rows, K, generator=g)
            _close(run(x), x.double() @ ref.double().T)


@interpreter
def test_int8_kernel_matches_int8_vectorwise_dequant():
    from qadapt.quant.triton.bnb import matmul_int8

    g = torch.Generator().manual_seed(1)
    w = torch.randn(72, 200, generator=g)
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    ref = F.int8_vectorwise_dequant(cb, scb)
    assert torch.equal(matmul_int8(torch.eye(200), cb, scb, exact=True), ref.T)
    for rows in (1, 5):
        x = torch.randn(rows, 200, generator=g)
        _close(matmul_int8(x, cb, scb, exact=True), x.double() @ ref.double().T)


@interpreter
def test_bnb_kernels_check_their_inputs():
    from qadapt.quant.triton.bnb import matmul_4bit, matmul_int8

    q, st = F.quantize_4bit(torch.randn(32, 128), quant_type="nf4", compress_statistics=True)
    x = torch.zeros(2, 128)
    with pytest.raises(ValueError, match="codes must be torch.uint8 with 2048"):
        matmul_4bit(x, q[:10], st.absmax, st.code, 64, (32, 128))
    with pytest.raises(ValueError, match="absmax must be torch.float32"):  # a nested absmax without its state
        matmul_4bit(x, q, st.absmax, st.code, 64, (32, 128))
    with pytest.raises(ValueError, match="needs code2 and offset"):
        matmul_4bit(x, q, st.absmax, st.code, 64, (32, 128), absmax2=st.state2.absmax)
    with pytest.raises(ValueError, match=r"\[M, 128\]"):
        matmul_4bit(torch.zeros(2, 64), q, st.absmax, st.code, 64, (32, 128), absmax2=st.state2.absmax,
                    code2=st.state2.code, offset=st.offset)
    with pytest.raises(ValueError, match="int8"):
        matmul_int8(x, torch.zeros(4, 128), torch.ones(4))
    with pytest.raises(ValueError, match="scb must be"):
        matmul_int8(x, torch.zeros(4, 128, dtype=torch.int8), torch.ones(3))


@interpreter
@pytest.mark.parametrize("quant", ["nf4-dq", "fp4", "int8"])
def test_layer_use_triton_keeps_the_stored_weight(quant):
    """After use_triton() the layer holds the checkpoint's tensors as buffers (nested absmax still uint8, the
    CPU repack undone, bitsandbytes' copy dropped), dequantize() is unchanged and the forward is x @ W.T."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(64, 128, generator=g), torch.randn(64, generator=g)
    layer = BnbLinear.quantize(w, b, quant.removesuffix("-dq"), double_quant=quant.endswith("-dq"))
    before = layer.dequantize()
    layer.use_triton()
    assert layer.path == "triton" and layer.inner.weight is None
    assert torch.equal(layer.dequantize(), before)
    bufs = dict(layer.named_buffers())
    if quant == "int8":
        assert set(bufs) == {"cb", "scb"} and layer.inner.state.CB is None
    else:
        assert bufs["codes"].dtype == torch.uint8 and bufs["codes"].numel() == 64 * 128 // 2
        if quant == "nf4-dq":
            assert bufs["absmax"].dtype == torch.uint8 and bufs["absmax2"].dtype == torch.float32
    assert layer.nbytes == sum(t.numel() * t.element_size() for t in bufs.values()) + 64 * 4
    x = torch.randn(2, 3, 128, generator=g)
    _close(layer(x), x.double() @ before.double().T + b.double())


@pytest.fixture(scope="module")
def bnb_folders(tmp_path_factory):
    """A full-precision folder (quantized on load), a transformers-saved nf4 double-quant checkpoint, an adapter."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    d = tmp_path_factory.mktemp("bnb_triton")
    hf = tiny_hf("llama", seed=3)
    hf.save_pretrained(d / "fp")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(d / "fp", quantization_config=cfg, device_map="cpu").save_pretrained(d / "pre")
    return d, {"a": str(write_peft_adapter(hf, d / "a", 5))}


#: case -> (folder, qadapt.load kwargs)
MODEL_CASES = {"nf4-dq": ("fp", dict(quant="nf4", double_quant=True)), "fp4": ("fp", dict(quant="fp4")),
               "int8": ("fp", dict(quant="int8")), "nf4-dq-saved": ("pre", {})}


@interpreter
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bnb_model_on_the_triton_path_matches_dequantize(bnb_folders, case):
    """kernels="triton" (the device path on the CPU interpreter: the bnb layers on the Triton kernel, the adapter
    in slots) against mode="dequantize" of the same checkpoint, with and without a LoRA: 1e-5 of the logit scale."""
    d, ads = bnb_folders
    folder, kw = MODEL_CASES[case]
    ref = qadapt.load(d / folder, mode="dequantize", adapters=ads, activate=[], **kw)
    tri = qadapt.load(d / folder, kernels="triton", adapters=ads, activate=[], **kw)
    layers = [m for m in tri.decoder.modules() if isinstance(m, BnbLinear)]
    assert tri.base_format == "bnb" and tri._slots is not None and len(layers) == 14
    assert {m.path for m in layers} == {"triton"}
    if case.startswith("nf4-dq"):  # nested really is nested, and stays so on the device path
        assert all(m._state4.nested and m.absmax.dtype == torch.uint8 and m.absmax2 is not None for m in layers)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    for act in ([], ["a"]):
        ref.activate_adapters(act)
        tri.activate_adapters(act)
        _close(tri.logits(ids), ref.logits(ids).double())


@interpreter
@pytest.mark.parametrize("case", ["nf4-dq-saved", "fp4"])
def test_bitsandbytes_own_kernel_on_the_device_path(bnb_folders, case, monkeypatch):
    """``QADAPT_BNB_KERNEL=bnb`` (the default on a GPU): bitsandbytes' ``matmul_4bit`` on the layer's buffers as a
    QuantState (nested absmax included), here its CPU kernel in float32, against mode="dequantize" with and
    without a LoRA: 1e-5 of the logit scale."""
    d, ads = bnb_folders
    folder, kw = MODEL_CASES[case]
    ref = qadapt.load(d / folder, mode="dequantize", adapters=ads, activate=[], **kw)
    tri = qadapt.load(d / folder, kernels="triton", adapters=ads, activate=[], **kw)
    monkeypatch.setenv("QADAPT_BNB_KERNEL", "bnb")
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    calls = []
    real = bnb_mod._bnb_matmul
    monkeypatch.setattr(bnb_mod, "_bnb_matmul", lambda *a: calls.append(1) or real(*a))
    for act in ([], ["a"]):
        ref.activate_adapters(act)
        tri.activate_adapters(act)
        _close(tri.logits(ids), ref.logits(ids).double())
    assert len(calls) == 2 * 14
    monkeypatch.setenv("QADAPT_BNB_KERNEL", "fast")
    with pytest.raises(UnsupportedError, match="QADAPT_BNB_KERNEL='fast'"):
        tri.logits(ids)


@cuda
@pytest.mark.parametrize("case", ["nf4-dq", "int8"])
def test_cuda_bnb_model_matches_the_cpu(bnb_folders, case):
    """On the GPU: float16 tiles with float32 accumulation against the CPU's dequantized float32 model: 2e-3 of
    the logit scale (float16 rounding of activations and weights, 2^-10 relative per product, two layers)."""
    d, ads = bnb_folders
    folder, kw = MODEL_CASES[case]
    ref = qadapt.load(d / folder, mode="dequantize", adapters=ads, activate=["a"], **kw)
    gpu = qadapt.load(d / folder, device="cuda", adapters=ads, activate=["a"], **kw)
    assert {m.path for m in gpu.decoder.modules() if isinstance(m, BnbLinear)} == {"triton"}
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    _close(gpu.logits(ids), ref.logits(ids).double(), 2e-3)
