"""What a user gets without options: ``qadapt.load(path)`` and ``qadapt run`` pick the fast path.

The suite runs the exact kernels (tests/conftest.py sets ``$QADAPT_KERNELS``) because its references are
float32; here the variable is removed, as on a user's machine. References: the layer paths the kernel table
names (qadapt/quant/kernels.py) and, for the numbers, tests/test_q8_kernels.py's bounds against transformers.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import qadapt
from models import tiny_hf, write_quantized
from qadapt.errors import InputError
from qadapt.quant import native


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("defaults")
    hf = tiny_hf("llama", seed=5, hidden_size=256, intermediate_size=512)
    out = {}
    for q in ("Q4_0", "Q8_0", "Q4_K", "Q3_K"):
        out[q] = (write_quantized(hf, d / f"m-{q}.gguf", q, seed=6), d / f"m-{q}.gguf")
    return out


def paths(m) -> set[str]:
    return {lin.path for blk in m.decoder.blocks for lin in blk.linears.values()}


@pytest.mark.parametrize("qtype,want", [("Q4_0", "q8"), ("Q8_0", "q8"), ("Q4_K", "q8"), ("Q3_K", "blockwise")])
def test_the_default_is_the_fast_path(files, qtype, want, monkeypatch):
    lib = native.library()
    if lib is None or not lib.simd:
        pytest.skip("the native q8 kernels do not run on this machine")
    monkeypatch.delenv("QADAPT_KERNELS", raising=False)
    m = qadapt.load(files[qtype][1])
    assert paths(m) == {want}  # Q3_K has no q8 kernel: its exact native path
    from qadapt.models.native import NativeDecoder

    assert isinstance(m.decoder, NativeDecoder)  # the fused decode step
    exact = qadapt.load(files[qtype][1], kernels="exact")
    assert paths(exact) == {"blockwise"} and not isinstance(exact.decoder, NativeDecoder)


def test_without_the_native_library_the_4bit_types_take_torchs_int4_kernel(files, monkeypatch):
    monkeypatch.delenv("QADAPT_KERNELS", raising=False)
    monkeypatch.setattr(native, "library", lambda: None)
    assert paths(qadapt.load(files["Q4_0"][1])) == {"int4pack"}
    assert paths(qadapt.load(files["Q8_0"][1])) == {"blockwise"}


def test_environment_sets_the_default_and_is_checked(files, monkeypatch):
    monkeypatch.setenv("QADAPT_KERNELS", "exact")
    assert paths(qadapt.load(files["Q4_0"][1])) == {"blockwise"}
    monkeypatch.setenv("QADAPT_KERNELS", "fastest")
    with pytest.raises(InputError, match=r"\$QADAPT_KERNELS must be one of auto, exact, q8"):
        qadapt.load(files["Q4_0"][1])


def test_default_logits_within_the_q8_bound(files, monkeypatch):
    """The default's numbers on a real (gguf-py-quantized) model: within tests/test_q8_kernels.py's bound of
    transformers on the dequantized weights (5% of the logit scale; argmax agreement >= 0.9)."""
    monkeypatch.delenv("QADAPT_KERNELS", raising=False)
    hf, path = files["Q4_0"]
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = hf(ids).logits
    got = qadapt.load(path).logits(ids)
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def test_cli_run_defaults_to_auto(files):
    """``qadapt run`` without --kernels: the same choice (its --help names auto as the default)."""
    r = subprocess.run([sys.executable, "-m", "qadapt", "run", "--help"], capture_output=True, text=True)
    assert "auto (the default" in r.stdout.replace("\n", " ")
