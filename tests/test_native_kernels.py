"""The native GGUF kernels (qadapt/quant/native) against gguf-py's dequantization.

Reference everywhere: ``gguf.quants.dequantize`` (weights) and a float64 matmul on them.

Tolerances:
- dequantization: none (float32 bits equal): the C code repeats gguf-py's float32
  operations in order, compiled with -ffp-contract=off.
- matmul: the weights are then exact, x is float32, and each product is accumulated by
  one float32 fused multiply-add (or a multiply and an add in the portable build), so
  the classical bound for summing K terms in any order applies:
  |y - ref| <= gamma_K * (|x| @ |W|.T), gamma_K = K u / (1 - K u), u = 2**-24
  (K u <= 1e-4 here, so 1.001 * K * u covers gamma_K). Observed: ~1e-3 of it.

Everything skips (not fails) when the machine has no C compiler.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qadapt
from qadapt.quant import GGMLLinear, kernels, native
from qadapt.quant.ggml import raw_bytes

from models import write_quantized, tiny_hf
from test_quant_ggml import raw_tensor, reference

HAVE_CC = native.compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler (cc, gcc, clang or $CC) on this machine")

TYPES = sorted(native.TYPES)
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK32 = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
#: in_features per type: K not a multiple of 256 (or of 8) where the block size allows it.
KS = {t: (1, 7, 770) if t in FLOAT_TYPES else (32, 96, 800) if t in BLOCK32 else (256, 768) for t in TYPES}
U = 2.0 ** -24


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gamma_K * (|x| @ |W|.T) for float32 accumulation over K = in_features (see the module doc)."""
    k = w.shape[1]
    return 1.001 * k * U * (x.double().abs() @ w.double().abs().T)


def within(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> bool:
    ref = x.double() @ w.double().T
    return bool(((y.double() - ref).abs() <= bound(x, w)).all())


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.fixture
def lib(monkeypatch):
    """The kernels as a user gets them (default flags, user cache); skip without a compiler."""
    if not HAVE_CC:
        pytest.skip("no C compiler")
    monkeypatch.delenv("QADAPT_NATIVE", raising=False)
    got = native.library()
    assert got is not None, "a C compiler is present but the native kernels did not build"
    return got


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The plain-C build (-DQA_PORTABLE, no intrinsics): what non-AVX2 machines run."""
    if not HAVE_CC:
        pytest.skip("no C compiler")
    path = native.build(tmp_path_factory.mktemp("cache"), (("-O3", "-DQA_PORTABLE", "-ffp-contract=off"),))
    assert path is not None
    return native.NativeKernels(path)


def _cases():
    for t in TYPES:
        for k in KS[t]:
            yield t, k


@needs_cc
@pytest.mark.parametrize("build", ["default", "portable"])
@pytest.mark.parametrize("qtype,k", list(_cases()))
def test_dequantize_bit_for_bit(lib, portable, build, qtype, k):
    """Reference: gguf.quants.dequantize; tolerance none."""
    kern = lib if build == "default" else portable
    data = raw_tensor(qtype, rows=5, cols=k, seed=k)
    got = kern.dequantize(raw_bytes(data, qtype, (5, k)), qtype, k)
    assert bits_equal(got, reference(data, qtype))


@needs_cc
@pytest.mark.parametrize("build", ["default", "portable"])
@pytest.mark.parametrize("qtype,k", list(_cases()))
def test_matmul_within_float32_accumulation(lib, portable, build, qtype, k):
    """Reference: x @ gguf_dequantized.T in float64; bound gamma_K (module doc). M = 1 (the
    register kernel), 3 and 17 (the scratch kernel, 4 rows a pass plus a remainder)."""
    kern = lib if build == "default" else portable
    n = 37
    data = raw_tensor(qtype, rows=n, cols=k, seed=k + 1)
    raw, w = raw_bytes(data, qtype, (n, k)), reference(data, qtype)
    g = torch.Generator().manual_seed(k)
    for m in (1, 3, 17):
        x = torch.randn(m, k, generator=g)
        y = kern.matmul(raw, qtype, k, x)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert within(y, x, w), (qtype, k, m)


@needs_cc
def test_matmul_edge_inputs(lib):
    """Reference: float64 matmul. bf16 and non-contiguous x are converted exactly; zero rows
    give an empty result; a weight whose byte width is not whole blocks is refused."""
    data = raw_tensor("Q6_K", rows=8, cols=512)
    raw, w = raw_bytes(data, "Q6_K", (8, 512)), reference(data, "Q6_K")
    x = torch.randn(512, 3).t()  # non-contiguous
    assert within(lib.matmul(raw, "Q6_K", 512, x), x, w)
    xb = torch.randn(2, 512).bfloat16()
    assert within(lib.matmul(raw, "Q6_K", 512, xb), xb.float(), w)
    assert lib.matmul(raw, "Q6_K", 512, torch.empty(0, 512)).shape == (0, 8)
    with pytest.raises(ValueError, match="Q6_K"):
        lib.matmul(raw, "Q6_K", 256, torch.randn(1, 256))


@pytest.mark.parametrize("native_on", [pytest.param(True, marks=needs_cc), False])
@pytest.mark.parametrize("qtype,compute", [(t, torch.float32) for t in TYPES] + [("BF16", torch.bfloat16)])
def test_layer_native_and_fallback_paths(monkeypatch, qtype, compute, native_on):
    """Reference: float64 matmul on gguf-py's weights. With QADAPT_NATIVE=0 the layer takes
    its torch path (bound 1e-5 * (|x| @ |W|.T) as test_quant_ggml's float32 test; bf16 for
    the int4pack types: its bound there); with the kernels on, inputs up to the layer's
    native_max_batch go native (gamma_K, in float32 whatever the compute dtype) and larger
    ones take the torch path (BF16 in bf16: the mapped array in torch's bf16 matmul, bound
    as test_quant_ggml's bf16 test)."""
    monkeypatch.setenv("QADAPT_NATIVE", "1" if native_on else "0")
    rows, cols = 48, 512
    data = raw_tensor(qtype, rows=rows, cols=cols, seed=3)
    w = reference(data, qtype)
    layer = GGMLLinear(data, qtype, (rows, cols), compute_dtype=compute)
    calls = []
    lib = native.library()
    assert (lib is not None) == native_on
    if lib is not None:
        monkeypatch.setattr(lib, "matmul", lambda *a, _f=lib.matmul: calls.append(a[3].shape[0]) or _f(*a))
    g = torch.Generator().manual_seed(4)
    limit = layer.native_max_batch
    for m in (1, 3, 17):
        calls.clear()
        x = torch.randn(m, cols, generator=g)
        y = layer(x.reshape(m, 1, cols)).reshape(m, rows)
        went_native = bool(calls)
        assert went_native == (native_on and m <= limit), (m, limit)
        if compute == torch.bfloat16 and not went_native:
            ref = x.double() @ w.double().T
            assert ((y.double() - ref).abs() <= 2 ** -8 * (x.double().abs() @ w.double().abs().T) + 2 ** -8 * ref.abs()).all()
        elif went_native or layer.path == "dense" or layer._int4 is None:
            tol = bound(x, w) if went_native else 1e-5 * (x.double().abs() @ w.double().abs().T)
            assert ((y.double() - x.double() @ w.double().T).abs() <= tol).all(), m
        else:  # int4pack (bf16): test_quant_ggml's bound
            ref = x.double() @ w.double().T
            assert ((y.double() - ref).abs() <= 2 ** -7 * (x.double().abs() @ w.double().abs().T) + 2 ** -7 * ref.abs()).all()
    if qtype == "F32":
        assert limit == 0  # the mapped float32 array is already the weight
    else:
        assert limit == (kernels.NATIVE_INT4_MAX_BATCH if layer.path == "int4pack" else kernels.NATIVE_MAX_BATCH)


@needs_cc
@pytest.mark.parametrize("qtype", sorted(kernels.INT4PACK_TYPES))
def test_int4_types_without_repack(lib, monkeypatch, qtype):
    """INT4PACK_WITH_NATIVE=False: Q4 types keep no packed copy and compute in float32 from the
    raw bytes. Reference: float64 matmul; gamma_K up to NATIVE_MAX_BATCH rows (native), the
    float32 blockwise bound 1e-5 * (|x| @ |W|.T) above."""
    monkeypatch.setattr(kernels, "INT4PACK_WITH_NATIVE", False)
    data = raw_tensor(qtype, rows=48, cols=512, seed=6)
    w = reference(data, qtype)
    layer = GGMLLinear(data, qtype, (48, 512))
    assert layer.path == "blockwise" and layer._int4 is None and layer.nbytes == data.nbytes
    for m in (1, 3, kernels.NATIVE_MAX_BATCH + 5):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
        tol = bound(x, w) if m <= kernels.NATIVE_MAX_BATCH else 1e-5 * (x.double().abs() @ w.double().abs().T)
        assert ((layer(x).double() - x.double() @ w.double().T).abs() <= tol).all(), m


@needs_cc
def test_blockwise_uses_native_dequantize(lib, monkeypatch):
    """Reference: gguf.quants.dequantize. Above NATIVE_MAX_BATCH rows the layer dequantizes
    into its scratch natively (same bits), then runs torch's float32 GEMM: 1e-5 bound."""
    data = raw_tensor("Q5_K", rows=48, cols=512)
    layer = GGMLLinear(data, "Q5_K", (48, 512))
    assert bits_equal(layer._dequant_rows(3, 40), reference(data, "Q5_K")[3:40])
    seen = []
    monkeypatch.setattr(lib, "dequantize", lambda *a, _f=lib.dequantize: seen.append(1) or _f(*a))
    x = torch.randn(kernels.NATIVE_MAX_BATCH + 1, 512)
    w = reference(data, "Q5_K").double()
    y = layer(x)
    assert seen and ((y.double() - x.double() @ w.T).abs() <= 1e-5 * (x.double().abs() @ w.abs().T)).all()


def test_no_compiler_falls_back(monkeypatch, caplog):
    """No install-time build and no compiler (or QADAPT_NATIVE=0): library() is None, the reason is a WARNING,
    and layers still compute (reference as test_quant_ggml's float32 test). Runs everywhere."""
    monkeypatch.delenv("QADAPT_NATIVE", raising=False)
    monkeypatch.setattr(native, "installed_variants", lambda: {})
    monkeypatch.setattr(native, "compiler", lambda: None)
    native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="qadapt.quant.native"):
            assert native.library() is None
        assert "no C compiler" in caplog.text and "WARNING" in caplog.text
        data = raw_tensor("Q8_0", rows=16, cols=64)
        x = torch.randn(1, 64)
        w = reference(data, "Q8_0").double()
        y = GGMLLinear(data, "Q8_0", (16, 64))(x)
        assert ((y.double() - x.double() @ w.T).abs() <= 1e-5 * (x.double().abs() @ w.abs().T)).all()
    finally:
        native.reset()


def test_installed_builds_are_the_ones_used():
    """`pip install` built the kernels once per instruction-set level (setup.py); library() loads the best one
    this CPU supports, never a compile-on-first-use build."""
    builds = native.installed_variants()
    assert "portable" in builds, "the package was installed without its native kernels (setup.py)"
    have = native.cpu_features(builds)
    best = next(n for n, need in native.VARIANTS if n in builds and have & need == need)
    native.reset()
    try:
        assert native.library().variant == best and native.library().path == builds[best]
    finally:
        native.reset()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K", "IQ4_XS", "F16"])
def test_every_installed_variant_computes_the_same(qtype):
    """Each build this CPU can run (the portable one everywhere): gguf-py's weights bit for bit, the exact matmul
    within its float32 bound; the 8-bit kernels of the SIMD builds give the same bits in every build (integer
    dot products; the AVX-512 passes are checked against the AVX2 ones)."""
    builds = native.installed_variants()
    have = native.cpu_features(builds)
    libs = {n: native.NativeKernels(builds[n]) for n, need in native.VARIANTS
            if n in builds and have & need == need}
    data = raw_tensor(qtype, rows=32, cols=512, seed=9)
    raw = raw_bytes(data, qtype, (32, 512))
    w = reference(data, qtype)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    q8 = {}
    for name, lib in libs.items():
        assert bits_equal(lib.dequantize(raw, qtype, 512), w), name
        y = lib.matmul(raw, qtype, 512, x)
        assert ((y.double() - x.double() @ w.double().T).abs() <= bound(x, w)).all(), name
        if lib.supports_q8(qtype):
            q8[name] = lib.matmul_q8(raw, qtype, 512, x)
    assert len(set(libs)) >= 1 and all(torch.equal(v, next(iter(q8.values()))) for v in q8.values()), list(q8)


def test_a_build_of_another_source_is_not_used(tmp_path, monkeypatch, caplog):
    """A checkout whose ggml_kernels.c changed since `pip install -e .`: its builds are older than the source, so
    none is used (the source hash compiled into each says so) and a warning says to rebuild."""
    changed = tmp_path / "ggml_kernels.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* edited */\n")
    (tmp_path / "ggml_types.h").write_text(native.HEADER.read_text())
    monkeypatch.setattr(native, "SOURCE", changed)
    monkeypatch.setattr(native, "HEADER", tmp_path / "ggml_types.h")
    with caplog.at_level(logging.WARNING, logger="qadapt.quant.native"):
        assert native.installed_variants() == {}
    assert "rebuild" in caplog.text


@needs_cc
def test_failed_compile_is_remembered_and_survived(tmp_path, monkeypatch):
    """A flag set the compiler rejects is skipped (and marked .failed) in favour of the next."""
    bad = (("-O3", "--no-such-flag-qadapt"), ("-O3", "-ffp-contract=off"))
    path = native.build(tmp_path, bad)
    assert path is not None and path.exists()
    assert len(list((tmp_path / "native").glob("*.failed"))) == 1
    assert native.build(tmp_path, bad) == path  # cached: same file, not rebuilt
    assert native.build(tmp_path, bad[:1]) is None


@needs_cc
def test_concurrent_builds_share_one_file(tmp_path):
    """Two processes building into one empty cache at once: both load a library, one .so
    remains and no temp file is left behind (compile to a temp name, then rename)."""
    code = ("import sys; from qadapt.quant import native; p = native.build(sys.argv[1]); "
            "native.NativeKernels(p); print(p)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs) and outs[0] == outs[1]
    files = sorted(f.name for f in (tmp_path / "native").iterdir())
    assert files == [Path(outs[0]).name]


@needs_cc
@pytest.mark.parametrize("qtype", ["Q8_0", "F16", "Q6_K", "Q4_K"])
def test_inplace_decode_matches_transformers(tmp_path, lib, qtype):
    """Reference: transformers' LlamaForCausalLM on gguf-py-dequantized weights. In place, a
    decode step runs every linear natively (one input row; Q4_K too, NATIVE_INT4_MAX_BATCH
    = 1), so greedy tokens (transformers' own KV cache) must agree exactly; logits of 1- and
    5-token inputs (native: <= NATIVE_MAX_BATCH rows) agree to 1e-4 of their range (float32
    accumulation order only; the logits test in test_gguf_runtime uses the same bound)."""
    wide = qtype in ("Q6_K", "Q4_K")
    hf = tiny_hf("llama", seed=1, **(dict(hidden_size=256, intermediate_size=512) if wide else {}))
    path = tmp_path / f"{qtype}.gguf"
    ref = write_quantized(hf, path, qtype, seed=2)
    prompt = [1, 5, 9, 40, 41, 42, 7]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    m = qadapt.load(path, mode="inplace")
    got = m.generate(prompt, max_new_tokens=8)
    n = len(got.token_ids)
    assert got.token_ids == want[:n] and (n == 8 or want[n] == 0)
    for length in (1, 5):
        ids = torch.tensor([prompt[:length]])
        with torch.no_grad():
            full = ref(ids).logits
        err = float((m.logits(ids) - full).abs().max())
        tol = 1e-4 * float(full.abs().max()) + 1e-4  # exact kernels: native float32 or float32 dequantization
        assert err <= tol, (length, err)


@pytest.mark.slow
def test_kernels_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """The sanitizer target: ggml_kernels.c built with -fsanitize=address,undefined (the SIMD paths this CPU
    has), then this file's and test_q8_kernels.py's kernel tests run on it (QADAPT_NATIVE_LIB) with the
    sanitizer runtimes preloaded: any out-of-bounds access or undefined behaviour aborts them.
    ``python -m pytest -m slow -k sanitizers``."""
    cc = native.compiler()
    libasan = subprocess.run([cc or "gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    libubsan = subprocess.run([cc or "gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    if cc is None or not Path(libasan).is_file() or not Path(libubsan).is_file():
        pytest.skip("needs a C compiler with AddressSanitizer and UBSan runtimes")
    lib = tmp_path / "kernels_asan.so"
    isa = ["-march=native"]
    subprocess.run([cc, "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=undefined", "-fopenmp", "-ffp-contract=off", *isa, "-shared", "-fPIC",
                    "-o", str(lib), str(native.SOURCE), "-lm"], check=True, timeout=300)
    env = {**os.environ, "QADAPT_NATIVE_LIB": str(lib), "LD_PRELOAD": f"{libasan}:{libubsan}",
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1", "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}
    tests = Path(__file__).parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        str(tests / "test_native_kernels.py"), str(tests / "test_q8_kernels.py"),
                        "-k", "not sanitizers and not installed and not inplace_decode and not concurrent "
                              "and not no_compiler"],
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])


def test_block_geometry_has_one_source():
    """The C kernels' type ids and block sizes come from ggml_types.h, generated from gguf-py's GGML_QUANT_SIZES
    (tools/gen_native_types.py): the header must be what gguf-py's table gives now, and the Python side's list
    of native types is its rows."""
    from qadapt.quant.types import GGML_TYPE_NAMES

    r = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "gen_native_types.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert native.TYPES == set(GGML_TYPE_NAMES)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_rows_read_half_precision_factors_as_they_are(portable, dtype):
    """An adapter file's bf16/fp16 factors go to the LoRA kernel as they are (converted in registers, F16C /
    bf16 << 16, or through a buffer in the portable build): every build gives PEFT's maths on the upcast
    factors (float64 here) within float32 accumulation, 1e-5 of the output scale (K = 1000 and N = 93 are
    not multiples of 8: the tails run too), and a plan naming another element type is refused unwritten."""
    from qadapt.quant.native import lora_plan

    g = torch.Generator().manual_seed(3)
    K, N, r = 1000, 93, 12
    x = torch.randn(3, K, generator=g)
    A = (torch.randn(r, K, generator=g) / 30).to(dtype)
    Bt = (torch.randn(r, N, generator=g) / 4).to(dtype)
    want = 0.5 * (x.double() @ A.double().T) @ Bt.double()
    builds = native.installed_variants()
    have = native.cpu_features(builds)
    libs = {n: native.NativeKernels(builds[n]) for n, need in native.VARIANTS if n in builds and have & need == need}
    libs["portable (QA_PORTABLE)"] = portable
    for name, lib in libs.items():
        y = torch.zeros(3, N)
        lib.lora_rows(y, x, lora_plan([(i, A, Bt, 0.5) for i in range(3)]))
        torch.testing.assert_close(y.double(), want, atol=1e-5 * float(want.abs().max()), rtol=0, msg=name)
    plan = lora_plan([(0, A, Bt, 0.5)])
    plan[0, 8] = 2  # Q4_0: not a factor type
    y = torch.zeros(3, N)
    with pytest.raises(ValueError, match="refused its plan"):
        portable.lora_rows(y, x, plan)
    assert not y.any()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        lora_plan([(0, A, Bt.float() if dtype != torch.float32 else Bt.half(), 0.5)])
