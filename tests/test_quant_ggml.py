"""GGUF quantized layers against gguf-py's reference dequantization (``gguf.quants``).

Fixtures are built here: types gguf-py can quantize are quantized from random
normals; K-quants and IQ types are random bytes with small fp16 (super-)block
scales written in, so every block is valid and finite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qadapt.errors import FormatError, UnsupportedError
from qadapt.quant import (
    BLOCK_TYPES, INT4PACK_TYPES, DenseLinear, GGMLEmbedding, GGMLLinear, dequantize_array, kernel_path,
    make_embedding, make_linear, take_rows,
)
from qadapt.quant.types import GGML_TYPE_NAMES

ROWS, COLS = 64, 512
#: Byte offsets of the fp16 scale fields of types gguf-py cannot quantize.
F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
              "IQ4_NL": (0,), "IQ4_XS": (0,)}
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
BLOCKWISE_TYPES = tuple(t for t in GGML_TYPE_NAMES if t not in INT4_TYPES and t != "F32")


def raw_tensor(qtype: str, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> np.ndarray:
    """Raw data laid out as gguf-py's reader returns it (float32/float16 [rows, cols] for
    F32/F16, uint8 [rows, bytes_per_row] otherwise)."""
    rng = np.random.default_rng(seed)
    qt = GGMLQuantizationType[qtype]
    if qtype not in F16_FIELDS:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        x += rng.uniform(-0.5, 0.5, (rows, 1)).astype(np.float32)  # offset blocks, so Q*_1 mins matter
        return x if qtype == "F32" else gguf_quantize(x, qt)
    block, size = GGML_QUANT_SIZES[qt]
    b = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = rng.uniform(1e-3, 1e-1, len(b)) * rng.choice([-1.0, 1.0], len(b))
        b[:, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


def reference(data: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf_dequantize(data, GGMLQuantizationType[qtype]), dtype=np.float32))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_every_listed_type_is_registered():
    """Reference: qadapt's own type list (types.GGML_TYPE_NAMES) and path table (kernels.py)."""
    assert set(BLOCK_TYPES) == set(GGML_TYPE_NAMES)
    assert set(INT4_TYPES) == INT4PACK_TYPES
    assert all(BLOCK_TYPES[t].int4_group == 32 for t in INT4_TYPES)
    assert kernel_path("F32") == "dense" and kernel_path("BF16", torch.bfloat16) == "dense"
    assert kernel_path("F32", torch.bfloat16) == "blockwise" and kernel_path("Q6_K") == "blockwise"


@pytest.mark.parametrize("qtype", GGML_TYPE_NAMES)
def test_dequantize_matches_gguf_py_bit_for_bit(qtype):
    """Reference: gguf.quants.dequantize; tolerance: none (float32 bits equal, -0.0 included)."""
    data = raw_tensor(qtype)
    ref = reference(data, qtype)
    assert same_bits(dequantize_array(data, qtype, (ROWS, COLS)), ref)
    assert same_bits(GGMLLinear(data, qtype, (ROWS, COLS)).dequantize(), ref)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_K"])
def test_dequantize_vector(qtype):
    """Reference: gguf.quants.dequantize on a 1-D tensor (norms, biases)."""
    data = raw_tensor(qtype, rows=1, cols=256)[0]
    assert same_bits(dequantize_array(data, qtype, (256,)), reference(data, qtype))


@pytest.mark.parametrize("qtype", BLOCKWISE_TYPES + ("F32",))
def test_forward_float32_matches_gguf_py(qtype):
    """Reference: x @ gguf_dequantized.T in float64. Tolerance 1e-5 * (|x| @ |W|.T): float32
    accumulation-order noise over 512 terms (~80 ulp of the absolute sum; observed <= 2% of
    it). Dequantization itself is checked bit for bit above; this checks the matmul path."""
    data = raw_tensor(qtype)
    w = reference(data, qtype).double()
    layer = GGMLLinear(data, qtype, (ROWS, COLS))
    x = torch.randn(2, 3, COLS, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (2, 3, ROWS) and y.dtype == torch.float32
    ref = x.double() @ w.T
    bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("qtype", BLOCKWISE_TYPES + ("F32",))
def test_forward_bf16_compute(qtype):
    """Reference: x @ gguf_dequantized.T. compute_dtype=bf16 rounds x, W and y to bf16
    (2**-9 relative each), so |err| <= 2**-8 * (|x| @ |W|.T) + 2**-8 * |y| (with slack)."""
    data = raw_tensor(qtype)
    w = reference(data, qtype).double()
    layer = GGMLLinear(data, qtype, (ROWS, COLS), compute_dtype=torch.bfloat16)
    x = torch.randn(4, COLS, generator=torch.Generator().manual_seed(2))
    y = layer(x).double()
    ref = x.double() @ w.T
    bound = 2 ** -8 * (x.double().abs() @ w.abs().T) + 2 ** -8 * ref.abs()
    assert ((y - ref).abs() <= bound).all()


def test_int4pack_kernel_semantics():
    """Reference: gpt-fast's convention w = (q - 8) * scale + zero per group of 32 along in.
    Inputs chosen exactly representable (integer x, power-of-two scales, half-integer zeros)
    and |y| < 256, so bf16 output is exact: tolerance none."""
    g = torch.Generator().manual_seed(3)
    n, k, group = 32, 128, 32
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = 2.0 ** torch.randint(-3, 0, (k // group, n), generator=g)
    zero = torch.randint(-4, 5, (k // group, n), generator=g) / 2
    x = torch.randint(-1, 2, (3, k), generator=g).float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    sz = torch.stack([scale, zero], -1).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, group, sz).float()
    w = (q - 8) * scale.repeat_interleave(group, 0).T + zero.repeat_interleave(group, 0).T
    ref = x @ w.T
    assert ref.abs().max() < 256 and torch.equal(y, ref)


def int4pack_layer(data, qtype, monkeypatch):
    """A layer on torch's int4 kernel: the default kernels' path where the native library is missing."""
    from qadapt.quant import native

    monkeypatch.setattr(native, "library", lambda: None)
    layer = GGMLLinear(data, qtype, (ROWS, COLS), kernels="auto")
    assert layer.path == "int4pack"
    assert GGMLLinear(data, qtype, (ROWS, COLS)).path == "blockwise"  # exact: never the bf16 kernel
    return layer


@pytest.mark.parametrize("qtype", INT4_TYPES)
def test_forward_int4pack_matches_gguf_py(qtype, monkeypatch):
    """Reference: x @ gguf_dequantized.T in float64. The kernel rounds x, each group's scale s
    and zero z, and y to bf16 (2**-9 relative each); with |q - 8| <= 8 every weight is off by
    <= 2**-9 * A, A = 8|s| + |z|, so |err| <= 2**-8 * (|x| @ A.T) + 2**-8 * |y| (1% slack for
    bf16 s, z in A). Also cosine(y, ref) > 0.9999 per row."""
    data = raw_tensor(qtype, seed=4)
    w = reference(data, qtype).double()
    layer = int4pack_layer(data, qtype, monkeypatch)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(5))
    y = layer(x).double()
    ref = x.double() @ w.T
    sz = layer._int4.scales_and_zeros.double().abs()  # [in / 32, out, 2]
    a = (8 * sz[..., 0] + sz[..., 1]).repeat_interleave(32, 0).T
    bound = 2 ** -8 * 1.01 * (x.double().abs() @ a.T) + 2 ** -8 * ref.abs()
    assert ((y - ref).abs() <= bound).all()
    assert (torch.nn.functional.cosine_similarity(y, ref, dim=-1) > 0.9999).all()


def test_int4pack_long_inputs_go_blockwise_bf16(monkeypatch):
    """Reference: x @ gguf_dequantized.T. Inputs over INT4PACK_MAX_BATCH rows take the
    blockwise path in bf16: tolerance as test_forward_bf16_compute."""
    from qadapt.quant import kernels

    data = raw_tensor("Q4_K")
    layer = int4pack_layer(data, "Q4_K", monkeypatch)
    monkeypatch.setattr(kernels, "INT4PACK_MAX_BATCH", 2)
    calls = []
    monkeypatch.setattr(layer._int4, "matmul", lambda x: calls.append(x))
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(10))
    w = reference(data, "Q4_K").double()
    y, ref = layer(x).double(), x.double() @ w.T
    assert not calls
    assert ((y - ref).abs() <= 2 ** -8 * (x.double().abs() @ w.abs().T) + 2 ** -8 * ref.abs()).all()


def test_int4pack_falls_back_when_rows_do_not_fit():
    """Reference: gguf.quants.dequantize. 24 output rows break the kernel's multiple-of-16
    rule, so the layer takes the blockwise float32 path (tolerance as the float32 test)."""
    data = raw_tensor("Q4_0", rows=24)
    layer = GGMLLinear(data, "Q4_0", (24, COLS))
    assert layer.path == "blockwise"
    w = reference(data, "Q4_0").double()
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(6))
    err = (layer(x).double() - x.double() @ w.T).abs()
    assert (err <= 1e-5 * (x.double().abs() @ w.abs().T)).all()


def test_blockwise_scratch_chunks(monkeypatch):
    """Reference: gguf.quants.dequantize. A tiny scratch forces many row chunks; the result
    must match one chunk up to BLAS blocking noise (which depends on the matrix shape):
    1e-5 * (|x| @ |W|.T), as the float32 test."""
    from qadapt.quant import kernels

    data = raw_tensor("Q6_K")
    layer = GGMLLinear(data, "Q6_K", (ROWS, COLS))
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(7))
    whole = layer(x)
    monkeypatch.setattr(kernels, "SCRATCH_BYTES", COLS * 4 * 5)  # 5 rows a chunk, 13 chunks
    w = reference(data, "Q6_K")
    assert ((layer(x) - whole).abs() <= 1e-5 * (x.abs() @ w.abs().T)).all()


def test_bias_is_added_in_float32():
    """Reference: gguf.quants.dequantize + torch.nn.functional.linear in float64; tolerance
    as the float32 test, 1e-5 * (|x| @ |W|.T + |b|)."""
    g = torch.Generator().manual_seed(9)
    data = raw_tensor("Q8_0")
    bias = torch.randn(ROWS, generator=g)
    layer = make_linear(data, "Q8_0", (ROWS, COLS), bias=bias)
    x = torch.randn(2, COLS, generator=g)
    w = reference(data, "Q8_0").double()
    ref = torch.nn.functional.linear(x.double(), w, bias.double())
    assert ((layer(x) - ref).abs() <= 1e-5 * (x.double().abs() @ w.abs().T + bias.double().abs())).all()
    assert layer.nbytes == data.nbytes + ROWS * 4


def _memmapped(tmp_path, data: np.ndarray) -> np.memmap:
    path = tmp_path / "t.bin"
    data.tofile(path)
    return np.memmap(path, dtype=data.dtype, mode="r", shape=data.shape)


@pytest.mark.parametrize("qtype", ["Q6_K", "Q8_0", "BF16", "F16", "Q4_K", "F32"])
def test_in_place_layer_holds_no_dense_copy(tmp_path, qtype):
    """Reference: the memory-mapped array itself. The layer views the mapped bytes (same
    data pointer) and holds no float tensor of out*in elements (F32 excepted: the mapped
    float32 array is the weight)."""
    mm = _memmapped(tmp_path, raw_tensor(qtype))
    layer = GGMLLinear(mm, qtype, (ROWS, COLS))
    assert layer.raw.data_ptr() == mm.ctypes.data
    tensors = [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    if layer._int4 is not None:
        tensors += [v for v in vars(layer._int4).values() if isinstance(v, torch.Tensor)]
    dense = [t for t in tensors if t.is_floating_point() and t.numel() >= ROWS * COLS]
    if qtype == "F32":
        assert layer.weight_is_dense and all(t.data_ptr() == mm.ctypes.data for t in dense)
    else:
        assert not layer.weight_is_dense and not dense
    assert layer.nbytes == mm.nbytes  # exact kernels: the blocks alone (no int4 copy)


def test_bf16_in_bf16_runs_on_the_mapped_bytes(tmp_path):
    """Reference: the memory-mapped array and gguf.quants.dequantize. A BF16 tensor computed
    in bf16 is its own weight: the layer's dense view is the mapping itself; tolerance as
    test_forward_bf16_compute."""
    mm = _memmapped(tmp_path, raw_tensor("BF16"))
    layer = GGMLLinear(mm, "BF16", (ROWS, COLS), compute_dtype=torch.bfloat16)
    assert layer.path == "dense" and layer._dense.data_ptr() == mm.ctypes.data and layer.nbytes == mm.nbytes
    w = reference(np.asarray(mm), "BF16").double()
    x = torch.randn(3, COLS, generator=torch.Generator().manual_seed(11))
    y, ref = layer(x).double(), x.double() @ w.T
    assert ((y - ref).abs() <= 2 ** -8 * (x.double().abs() @ w.abs().T) + 2 ** -8 * ref.abs()).all()


def test_embedding_rows_equal_dequantized_rows(tmp_path):
    """Reference: gguf.quants.dequantize, row-indexed; tolerance none (bits equal)."""
    mm = _memmapped(tmp_path, raw_tensor("Q5_K"))
    emb = make_embedding(mm, "Q5_K", (ROWS, COLS))
    assert isinstance(emb, GGMLEmbedding) and emb.raw.data_ptr() == mm.ctypes.data
    ids = torch.tensor([[3, 0, 63], [3, 7, 1]])
    out = emb(ids)
    ref = reference(np.asarray(mm), "Q5_K")
    assert out.shape == (2, 3, COLS) and same_bits(out, ref[ids])
    assert same_bits(emb.dequantize(), ref)
    head = emb.as_linear()
    assert head.raw.data_ptr() == mm.ctypes.data and not head.weight_is_dense
    dense = make_embedding(mm, "Q5_K", (ROWS, COLS), mode="dequantize")
    assert same_bits(dense(ids), ref[ids])


def test_take_rows_equals_dequantize_then_index():
    """Reference: gguf.quants.dequantize then row indexing; tolerance none. Rows are whole
    blocks, so permuting raw rows (llama.cpp's q/k un-permutation) is exact."""
    for qtype in ("Q4_K", "Q6_K", "F16", "BF16"):
        data = raw_tensor(qtype)
        perm = torch.randperm(ROWS, generator=torch.Generator().manual_seed(8))
        picked = take_rows(data, qtype, perm)
        assert same_bits(dequantize_array(picked, qtype, (ROWS, COLS)), reference(data, qtype)[perm])
    with pytest.raises(FormatError):
        take_rows(data, qtype, torch.tensor([ROWS]))


def test_dequantize_mode_gives_dense_linear():
    """Reference: gguf.quants.dequantize; tolerance none for the weight."""
    data = raw_tensor("Q3_K")
    layer = make_linear(data, "Q3_K", (ROWS, COLS), mode="dequantize")
    assert isinstance(layer, DenseLinear) and layer.weight_is_dense
    assert same_bits(layer.dequantize(), reference(data, "Q3_K"))
    bf = make_linear(data, "Q3_K", (ROWS, COLS), mode="dequantize", dtype=torch.bfloat16)
    assert bf.weight.dtype == torch.bfloat16


def test_refusals_name_the_problem():
    """Reference: gguf-py's block sizes (GGML_QUANT_SIZES)."""
    data = raw_tensor("Q8_0")
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        make_linear(data, "IQ2_XXS", (ROWS, COLS))
    with pytest.raises(FormatError, match="whole blocks"):
        make_linear(data, "Q8_0", (ROWS, 500))
    with pytest.raises(FormatError, match="bytes"):
        make_linear(data, "Q8_0", (ROWS * 2, COLS))
    with pytest.raises(UnsupportedError, match="mode"):
        make_linear(data, "Q8_0", (ROWS, COLS), mode="fast")
    with pytest.raises(UnsupportedError, match="compute_dtype"):
        make_linear(data, "Q8_0", (ROWS, COLS), dtype=torch.float16)
