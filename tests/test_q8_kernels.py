"""``kernels="q8"`` (llama.cpp's arithmetic) against references qadapt does not compute.

References:
- activation quantization: the rule written in torch (d = amax / 127, q = round-half-even(x * (127 / amax)),
  clamped to +-127), not the C code;
- weights: ``gguf.quants.dequantize`` of the same blocks (gguf-py quantizes Q4_0/Q4_1/Q5_0/Q5_1/Q8_0; the
  K-quants and IQ4_NL are random valid blocks);
- matmuls: float64 products of those two;
- whole models: transformers' LlamaForCausalLM on gguf-py-dequantized weights; LoRA deltas: PEFT's maths.

Tolerances (u = 2**-24, float32's unit roundoff):
- codes and scales: equal (the same float32 division, multiply and rounding);
- q8 matmul against float64 on the *quantized* activations: every block's integer sum is exact, then a
  product of two scales (1 rounding), a multiply by the sum (1), a fused multiply-add into a float32
  accumulator (1) and the final sums over at most K/32 + 8 partial sums: |err| <= (K/32 + 12) u
  sum |x_q| |w|, asserted with that bound;
- q8 matmul against the exact float input: the activation rounding, |y - x W^T| <= sum_b d_b / 2
  sum_{j in b} |w_j|, plus the float32 slack above;
- whole models against exact transformers: activation rounding in every linear of every layer; on these
  tiny models the logits move by ~0.5-1.5% of their largest magnitude, so 5% with the argmax kept on
  >= 90% of positions (the int4pack path's tolerance is 25%, test_gguf_runtime);
- whole models (+ LoRA through PEFT) against the same rule in torch: see :func:`_assert_q8_close`;
- native decode ops (rms norm, rotary + cache + attention, LoRA add) against the torch ops, exact kernels
  on both sides: float32 reordering only, 1e-5 of the logits' scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf import quants

import qadapt
from qadapt.models import native as native_decode
from qadapt.errors import InputError
from qadapt.quant import GGMLLinear, native

from models import make_adapter, peft_logits, random_blocks, tiny_hf, write_quantized

LIB = native.library()
needs_q8 = pytest.mark.skipif(LIB is None or not LIB.supports_q8("Q4_0"),
                              reason="the q8 kernels need a C compiler and an AVX2 CPU")
pytestmark = needs_q8

GGUF_QUANTIZES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
Q8_TYPES = GGUF_QUANTIZES + ("IQ4_NL", "Q4_K", "Q5_K", "Q6_K")
X8_TYPES = ("Q4_0", "Q8_0", "Q4_K", "Q6_K")  # the 8-row layouts
U = 2.0 ** -24


def _blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in GGUF_QUANTIZES:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        w += rng.uniform(-0.5, 0.5, (rows, 1)).astype(np.float32)  # offset rows: Q*_1 minimums matter
        return quants.quantize(w, GT[qtype])
    return random_blocks(qtype, rows, cols, rng)


def _quantize_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation rule in torch: scales [m, k/32], codes [m, k]."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    q = torch.round(xb * (127.0 / safe)).clamp(-127, 127)
    q = torch.where(amax > 0, q, torch.zeros_like(q))
    d = torch.where(amax > 0, amax / 127.0, torch.zeros_like(amax))
    return d.squeeze(-1), q.reshape(x.shape).to(torch.int8)


def test_activation_quantization_matches_the_rule():
    x = torch.randn(5, 512) * torch.logspace(-3, 2, 512)
    x[1, :32] = 0  # an all-zero block: scale 0, codes 0
    x[2, 40] = 1e30  # one huge value: the rest of its block rounds to 0
    d, q = LIB.quantize_q8(x)
    d_ref, q_ref = _quantize_ref(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(d.view(torch.int32), d_ref.view(torch.int32))


@pytest.mark.parametrize("qtype", Q8_TYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("N", [64, 72])
def test_q8_matmul_within_the_rounding_bounds(qtype, rows, N):
    """Rows and outputs cover every pass: one and several input rows (from 4 on, the 16-row passes take
    their steps outermost: 5, 8), a last tile of one row (9), two tiles (16), and output groups of 8
    taken in pairs (the 512-bit passes, 64) or with one left over (72)."""
    K = 512
    raw = torch.from_numpy(_blocks(qtype, N, K, seed=1)).view(torch.uint8).reshape(N, -1)
    w = torch.from_numpy(quants.dequantize(raw.numpy(), GT[qtype])).reshape(N, K).double()
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(2)) * 3
    d, q = _quantize_ref(x)
    xq = (q.double().view(rows, -1, 32) * d.double().unsqueeze(-1)).reshape(rows, K)
    ref = xq @ w.T
    slack = (K / 32 + 12) * U * (xq.abs() @ w.abs().T)
    rounding = ((d.double() / 2).repeat_interleave(32, 1)) @ w.abs().T  # |x - x_q| <= d / 2, elementwise
    outs = {"file layout": LIB.matmul_q8(raw, qtype, K, x)}
    if qtype in X8_TYPES:
        packed = LIB.repack_x8(raw, qtype, K)
        assert torch.equal(LIB.unrepack_x8(packed, qtype, N, K, raw.shape[1]), raw)  # same bytes, reordered
        outs["8-row layout"] = LIB.matmul_x8(packed, qtype, N, K, x)
    for name, y in outs.items():
        err = (y.double() - ref).abs()
        assert bool((err <= slack).all()), f"{qtype} {name}: max err/bound {float((err / slack).max()):.2f}"
        exact = x.double() @ w.T
        assert bool(((y.double() - exact).abs() <= rounding + slack).all()), f"{qtype} {name}: beyond the bound"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_deferred_repack_takes_its_rows_and_keeps_the_exact_weights(qtype):
    """A layer built for the background repack with a row permutation (llama.cpp's q/k order undone): while
    pending, .raw / dequantize() already give the permuted rows, and the repack takes them (reference: gguf-py's
    dequantization of the file's rows, indexed)."""
    from qadapt.quant import repack

    data = _blocks(qtype, 24, 256, seed=4)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    want = torch.from_numpy(quants.dequantize(data, GT[qtype])).reshape(24, 256)[perm]
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    with repack.deferred():
        pending = GGMLLinear(data, qtype, (24, 256), kernels="q8", row_perm=perm)
        other = GGMLLinear(data, qtype, (24, 256), kernels="q8", row_perm=perm)
    assert pending._pending is not None and other._pending is not None
    assert torch.equal(pending.dequantize(), want) and pending._pending is None  # .raw repacked it first
    eager = GGMLLinear(data, qtype, (24, 256), kernels="q8", row_perm=perm)
    assert torch.equal(other(x), eager(x)) and other._pending is None  # the forward repacks it first
    assert torch.equal(eager.dequantize(), want)


@pytest.mark.parametrize("qtype", X8_TYPES)
def test_q8_layer_keeps_the_exact_weights(qtype):
    """The 8-row layout replaces the file's bytes in memory; dequantize() and .raw still give gguf-py's."""
    data = _blocks(qtype, 24, 256, seed=3)
    layer = GGMLLinear(data, qtype, (24, 256), kernels="q8")
    assert layer.path == "q8" and layer._x8 is not None and layer._raw is None
    want = torch.from_numpy(quants.dequantize(data, GT[qtype])).reshape(24, 256)
    assert torch.equal(layer.dequantize(), want)
    assert torch.equal(layer.raw, torch.from_numpy(np.ascontiguousarray(data)).view(torch.uint8).reshape(24, -1))
    assert layer.nbytes >= data.nbytes  # the layout is never smaller than the file's blocks


def test_types_without_q8_kernels_stay_exact():
    data = _blocks("Q3_K", 16, 256, seed=4)
    layer = GGMLLinear(data, "Q3_K", (16, 256), kernels="q8")
    assert layer.path != "q8"
    x = torch.randn(2, 256)
    w = torch.from_numpy(quants.dequantize(data, GT["Q3_K"])).reshape(16, 256)
    torch.testing.assert_close(layer(x), x @ w.T, atol=1e-5, rtol=1e-5)


def test_release_pages_leaves_private_memory_alone():
    a = np.arange(1 << 20, dtype=np.uint8)
    assert native.release_pages(a) is False and int(a[12345]) == 12345 % 256


def test_unknown_kernels_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="kernels must be one of auto, exact, q8"):
        qadapt.load(tmp_path / "x.gguf", kernels="fast")
    with pytest.raises(InputError, match="mode='dequantize'"):
        qadapt.load(tmp_path / "x.gguf", mode="dequantize", kernels="q8")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = tmp_path_factory.mktemp("q8")
    cache = {}

    def get(qtype: str):
        if qtype not in cache:
            hf = tiny_hf("llama", seed=5, hidden_size=256, intermediate_size=512)
            cache[qtype] = (write_quantized(hf, out / f"m-{qtype}.gguf", qtype, seed=6), out / f"m-{qtype}.gguf", hf)
        return cache[qtype]

    return get


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_1"])
def test_q8_model_logits_near_transformers(tiny_models, qtype):
    """Types gguf-py quantizes, so the weights are a real model's (normal, quantized). The K-quants' random
    blocks make weights of up to ~1 and activations with one huge value per block (a silu(gate) * up of
    ~1e-7 median and ~20 max): there the activation rounding moves the logits by more than their scale,
    inside its bound (checked per layer: <= 0.14 of it), so they are covered by the per-matmul bound test."""
    ref, path, _ = tiny_models(qtype)
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ref(ids).logits
    got = qadapt.load(path, kernels="q8").logits(ids)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 0.05 * scale
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9


def _decode_logits(m, ids, ctx=None, steps=5):
    """Prefill ``ids``, then ``steps`` one-token steps (the native decode path); logits of every step."""
    with torch.inference_mode():
        cache = m.new_cache(ids.shape[1] + steps + 1)
        out = [m.decoder(ids, None, cache, ctx=ctx).logits[:, -1]]
        for p in range(ids.shape[1], ids.shape[1] + steps):
            out.append(m.decoder(torch.tensor([[3 + p]]), torch.tensor([[p]]), cache, ctx=ctx).logits[:, -1])
    return torch.cat(out)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_native_decode_ops_match_torch_ops(tmp_path, arch):
    """Exact kernels on both sides: only the small ops differ (rms norm, rotary + cache + attention)."""
    kw = dict(sliding_window=4) if arch == "mistral" else {}
    hf = tiny_hf(arch, seed=8, **kw)
    write_quantized(hf, tmp_path / "m.gguf", "Q8_0", seed=9)
    m = qadapt.load(tmp_path / "m.gguf")
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    torch_ops = _decode_logits(m, ids, steps=6)
    native_decode.apply(m.decoder, LIB)
    native_ops = _decode_logits(m, ids, steps=6)
    torch.testing.assert_close(native_ops, torch_ops, atol=1e-5 * float(torch_ops.abs().max()), rtol=0)


def test_q8_lora_delta_is_peft_maths(tiny_models, tmp_path):
    """The native LoRA add on a q8 base: y - base(x) = scale * B A x (float64 reference from PEFT's factors)."""
    from qadapt.adapters.lora import AdapterContext, LoraLinear

    _, path, hf = tiny_models("Q4_0")
    folder = make_adapter(hf, tmp_path / "a", seed=10)
    m = qadapt.load(path, kernels="q8", adapters={"a": str(folder)})
    lin = m.decoder.blocks[0].linears["q"]
    assert isinstance(lin, LoraLinear) and lin.base.path == "q8"
    x = torch.randn(1, 1, lin.in_features)
    f = lin.adapters["a"]
    with torch.inference_mode():
        delta = lin.forward(x, AdapterContext(active=("a",))) - lin.base.forward(x)
    want = (x.double().reshape(1, -1) @ f.A.double().T @ f.B.double().T) * f.scale
    torch.testing.assert_close(delta.double().reshape(1, -1), want, atol=1e-5 * float(want.abs().max()), rtol=0)


def q8_reference(model):
    """A copy of a transformers model whose every nn.Linear quantizes its input by the rule
    (:func:`_quantize_ref`) and multiplies in float64: llama.cpp's arithmetic, written independently."""
    import copy

    model = copy.deepcopy(model)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            def fwd(x, lin=mod):
                K = lin.in_features
                d, q = _quantize_ref(x.reshape(-1, K).float())
                xq = (q.double().view(-1, K // 32, 32) * d.double().unsqueeze(-1)).reshape(-1, K)
                return (xq @ lin.weight.double().T).float().reshape(*x.shape[:-1], -1)

            mod.forward = fwd
    return model


def _assert_q8_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The same rule on the same weights agrees to float32 reordering (~2e-7 of the scale, observed),
    except where an activation sits on a rounding tie that float32 noise upstream resolves the other way:
    one code moves by 1, that linear's output by d |w|, and attention carries it to later positions
    (observed <= 2.1e-3 of the scale). 5e-3 is still 3x tighter than q8's own distance from the exact
    model (0.5-1.5%); the rule itself (codes, scales) is pinned bit for bit per matmul above."""
    scale = float(want.abs().max())
    err = float((got - want).abs().max()) / scale
    assert err <= 5e-3, err


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q5_1"])
def test_q8_model_and_adapter_match_the_rule_on_peft(tiny_models, tmp_path, qtype):
    """qadapt q8 + LoRA against PEFT on a transformers model whose linears follow the q8 rule. 8 tokens:
    every linear (the 309-row head too, which has no 8-row layout) takes the q8 path at <= 8 rows."""
    ref, path, hf = tiny_models(qtype)
    folder = make_adapter(hf, tmp_path / "a", seed=11)
    rq = q8_reference(ref)
    m = qadapt.load(path, kernels="q8", adapters={"a": str(folder)})
    base = qadapt.load(path, kernels="q8")
    for seed in range(3):
        ids = torch.randint(0, ref.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            _assert_q8_close(base.logits(ids), rq(ids).logits)
        _assert_q8_close(m.logits(ids), peft_logits(rq, {"a": folder}, ["a"], ids))


def test_q8_decode_with_grouped_deltas_matches_peft(tiny_models, tmp_path):
    """Decode steps add every q/k/v (and o) delta inside the layer's grouped native call. Two adapters active
    at once, one on q and v only: the deltas of one output run in order, the others side by side; each
    step's logits against PEFT with both adapters on the q8-rule model (one forward over the prefix)."""
    ref, path, hf = tiny_models("Q4_0")
    folders = {"a": make_adapter(hf, tmp_path / "a", seed=30, target_modules=["q_proj", "v_proj"]),
               "b": make_adapter(hf, tmp_path / "b", seed=31, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}
    m = qadapt.load(path, kernels="q8", adapters={n: str(f) for n, f in folders.items()})
    from qadapt.adapters.lora import AdapterContext

    ctx = AdapterContext(active=("a", "b"))
    ids = torch.randint(1, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(32))
    want = peft_logits(q8_reference(ref), folders, ["a", "b"], ids)
    with torch.inference_mode():
        cache = m.new_cache(8)
        got = [m.decoder(ids[:, p:p + 1], torch.tensor([[p]]), cache, ctx=ctx).logits[0, -1] for p in range(6)]
    lora_plans = m.decoder.blocks[0]._groups[("lora", ("q", "k", "v"))][1]
    assert any(p is not None and p.shape[0] == 5 for p in lora_plans.values())  # a q, a v, b q, b k, b v
    # the steps ran as one native call through all layers (NativeKernels.decode_layers)
    assert [v is not None for v in native_decode.step_plans(m.decoder, cache).values()] == [True]
    for p in range(6):
        _assert_q8_close(got[p], want[0, p])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_adapter_files_stay_half_and_match_peft(tiny_models, tmp_path, dtype):
    """An adapter saved from a bf16/fp16 model (as PEFT saves it: factors in that dtype) is held as it is,
    half the bytes of float32; decode steps read it in the native call (the plan's type field says so) and the
    prefill's torch path computes in float32; on a base without the native kernels it is widened once. Reference: PEFT, which upcasts the file's factors into the
    float32 model: decode logits against the q8-rule model (:func:`_assert_q8_close`), the dequantized
    model's logits within 1e-4 (float32 maths in another order, as in test_lora)."""
    from safetensors.torch import load_file, save_file

    from qadapt.adapters.lora import AdapterContext
    from qadapt.quant.native import _type_id

    ref, path, hf = tiny_models("Q4_0")
    folder = make_adapter(hf, tmp_path / "a", seed=50)
    f32_bytes = qadapt.load(path, adapters={"a": str(folder)}).adapters["a"].nbytes
    st = folder / "adapter_model.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(st)).items()}, str(st))
    m = qadapt.load(path, kernels="q8", adapters={"a": str(folder)})
    lin = m.decoder.blocks[0].linears["q"]
    assert lin.adapters["a"].A.dtype == dtype and lin._bt["a"].dtype == dtype
    assert m.adapters["a"].nbytes * 2 == f32_bytes
    ids = torch.randint(1, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(51))
    want = peft_logits(q8_reference(ref), {"a": folder}, ["a"], ids)
    ctx = AdapterContext(active=("a",))
    with torch.inference_mode():
        cache = m.new_cache(8)
        got = [m.decoder(ids[:, p:p + 1], torch.tensor([[p]]), cache, ctx=ctx).logits[0, -1] for p in range(6)]
    plans = [p for p in m.decoder.blocks[0]._groups[("lora", ("q", "k", "v"))][1].values() if p is not None]
    assert plans and all((p[:, 8] == _type_id({torch.bfloat16: "BF16", torch.float16: "F16"}[dtype])).all()
                         for p in plans)
    for p in range(6):
        _assert_q8_close(got[p], want[0, p])
    _assert_q8_close(m.logits(ids), want[0])  # the prefill: torch's matmuls on the upcast factors
    exact = qadapt.load(path, mode="dequantize", adapters={"a": str(folder)})
    # no native kernel reads them there: widened once at attach, not on every torch matmul
    assert {f.A.dtype for f in exact.adapters["a"].factors.values()} == {torch.float32}
    want = peft_logits(ref, {"a": folder}, ["a"], ids)
    assert float((exact.logits(ids) - want).abs().max()) <= 1e-4


def test_qwen3_decode_runs_as_one_native_call_and_matches_peft(tmp_path):
    """Qwen3's per-head q/k RMS norms inside the one-call native decode step (head_dim 128 != hidden / heads):
    each step's logits with a LoRA on q/k/v/o against PEFT on the q8-rule transformers Qwen3 over the prefix."""
    from models import tiny_arch

    from qadapt.adapters.lora import AdapterContext

    hf = tiny_arch("qwen3", seed=60, wide=True)
    ref = write_quantized(hf, tmp_path / "m.gguf", "Q8_0", seed=61)
    folders = {"a": make_adapter(hf, tmp_path / "a", seed=62, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}
    m = qadapt.load(tmp_path / "m.gguf", kernels="q8", adapters={"a": str(folders["a"])})
    ids = torch.randint(1, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(63))
    want = peft_logits(q8_reference(ref), folders, ["a"], ids)
    ctx = AdapterContext(active=("a",))
    with torch.inference_mode():
        cache = m.new_cache(8)
        got = [m.decoder(ids[:, p:p + 1], torch.tensor([[p]]), cache, ctx=ctx).logits[0, -1] for p in range(6)]
    assert [v is not None for v in native_decode.step_plans(m.decoder, cache).values()] == [True]
    for p in range(6):
        _assert_q8_close(got[p], want[0, p])


def test_q8_decode_rows_in_a_sliding_window_match_peft(tmp_path):
    """The one-call decode step on Mistral with a 4-token window, two rows on different adapters at
    different positions (continuous batching): each row's logits against PEFT with its adapter on the
    q8-rule model over that row's own prefix (transformers applies the window in its mask)."""
    from qadapt.adapters.lora import AdapterContext

    hf = tiny_hf("mistral", seed=40, hidden_size=256, intermediate_size=512, sliding_window=4)
    ref = write_quantized(hf, tmp_path / "m.gguf", "Q8_0", seed=41)
    folders = {n: make_adapter(hf, tmp_path / n, seed=42 + i) for i, n in enumerate("ab")}
    m = qadapt.load(tmp_path / "m.gguf", kernels="q8", adapters={n: str(f) for n, f in folders.items()})
    rq = q8_reference(ref)
    ids = torch.randint(1, hf.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(43))
    starts = (3, 6)  # prompt lengths: row 0 has 3 prompt tokens, row 1 six
    ctx = AdapterContext(rows=(("a",), ("b",)))
    with torch.inference_mode():
        cache = m.new_cache(16, batch=2)
        for r, n in enumerate(starts):  # each row's prompt on its own (the cache row is the row's)
            one = m.new_cache(16)
            m.decoder(ids[r:r + 1, :n], None, one, ctx=AdapterContext(active=ctx.rows[r]))
            for layer in range(len(cache.k)):
                cache.k[layer][r].copy_(one.k[layer][0])
                cache.v[layer][r].copy_(one.v[layer][0])
        got = {0: [], 1: []}
        for s_ in range(3):
            pos = torch.tensor([[starts[0] + s_], [starts[1] + s_]])
            step = torch.stack([ids[0, starts[0] + s_], ids[1, min(starts[1] + s_, 8)]]).view(2, 1)
            out = m.decoder(step, pos, cache, ctx=ctx).logits[:, -1]
            for r in (0, 1):
                got[r].append(out[r])
    assert any(v is not None for v in native_decode.step_plans(m.decoder, cache).values())
    for r, name in enumerate("ab"):
        seq = torch.cat([ids[r, :starts[r]], torch.stack([ids[0, starts[0] + s_] if r == 0 else ids[1, min(starts[1] + s_, 8)]
                                                          for s_ in range(3)])]).view(1, -1)
        want = peft_logits(rq, folders, [name], seq)[0, starts[r]:]
        for s_ in range(3):
            _assert_q8_close(got[r][s_], want[s_])


def test_q8_greedy_decode_follows_its_own_forward(tiny_models):
    """Token by token (native attention, grouped q/k/v and gate/up calls) against one full forward per
    step of the same q8 model: the same arithmetic per row, so the greedy tokens agree."""
    _, path, _ = tiny_models("Q4_0")
    m = qadapt.load(path, kernels="q8")
    ids = torch.tensor([[1, 4, 8, 15, 16, 23]])
    seq = ids
    with torch.inference_mode():
        for _ in range(6):
            nxt = m.decoder(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        cache = m.new_cache(16)
        tok = m.decoder(ids, None, cache).logits[:, -1].argmax(-1, keepdim=True)
        got = [int(tok)]
        for p in range(ids.shape[1], ids.shape[1] + 5):
            tok = m.decoder(tok, torch.tensor([[p]]), cache).logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(tok))
    assert got == seq[0, ids.shape[1]:].tolist()


def test_native_decode_rows_at_different_positions(tmp_path):
    """A batch whose rows sit at different positions (continuous batching): the native attention (each row
    its own keys) against the torch path (the causal mask from positions), exact kernels on both sides."""
    hf = tiny_hf("llama", seed=13)
    write_quantized(hf, tmp_path / "m.gguf", "Q8_0", seed=14)
    m = qadapt.load(tmp_path / "m.gguf")
    ids = torch.randint(1, hf.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(15))
    outs = []
    for lib in (None, LIB):
        native_decode.apply(m.decoder, lib)
        with torch.inference_mode():
            cache = m.new_cache(16, batch=3)
            m.decoder(ids, torch.arange(6).expand(3, 6), cache)
            pos = torch.tensor([[6], [3], [5]])  # rows of 6, 3 and 5 prompt tokens (the rest is padding)
            steps = []
            for s in range(4):
                steps.append(m.decoder(torch.tensor([[7], [8], [9]]) + s, pos + s, cache).logits[:, -1])
        outs.append(torch.stack(steps))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5 * float(outs[0].abs().max()), rtol=0)


def test_q8_rows_on_different_adapters_match_one_at_a_time(tiny_models, tmp_path):
    """Rows on different adapters in one batch (the native per-row LoRA add) against each row run alone
    with its adapter active: the same q8 arithmetic per row, only the LoRA add's summation order differs."""
    from qadapt.adapters.lora import AdapterContext

    _, path, hf = tiny_models("Q4_0")
    folders = {n: make_adapter(hf, tmp_path / n, seed=20 + i) for i, n in enumerate("abc")}
    m = qadapt.load(path, kernels="q8", adapters={n: str(f) for n, f in folders.items()})
    rows = (("a",), ("b", "c"), ("c",), ())  # a row with two adapters: its deltas on one output run in order
    ids = torch.randint(1, hf.config.vocab_size, (4, 1), generator=torch.Generator().manual_seed(16))
    with torch.inference_mode():
        cache = m.new_cache(4, batch=4)
        got = m.decoder(ids, torch.zeros(4, 1, dtype=torch.int64), cache, ctx=AdapterContext(rows=rows)).logits
        for i, names in enumerate(rows):
            one = m.decoder(ids[i:i + 1], None, m.new_cache(4), ctx=AdapterContext(active=names) if names else None)
            torch.testing.assert_close(got[i], one.logits[0], atol=1e-4 * float(one.logits.abs().max()), rtol=0)


def test_fused_native_mlp_matches_its_parts(tiny_models):
    """The one-call MLP (norm, grouped gate/up, silu * up, down, residual) against the same q8 linears called
    one by one through torch ops: float32 reordering in the norm and silu only, unless that reordering moves
    an activation across a rounding tie of the down projection's input (one code by 1: d |w|, < 1e-3 here)."""
    _, path, _ = tiny_models("Q4_0")
    m = qadapt.load(path, kernels="q8")
    blk = m.decoder.blocks[0]
    assert blk._fused_mlp() is not None
    x = torch.randn(1, 1, blk.cfg.hidden_size, generator=torch.Generator().manual_seed(17))
    with torch.inference_mode():
        fused = blk.mlp(x, None)
        native_decode.revert(m.decoder)
        parts = blk.mlp(x, None)
    torch.testing.assert_close(fused, parts, atol=1e-3 * float(parts.abs().max()), rtol=0)


def test_native_lora_rows_on_strided_rows():
    """``lora_rows`` against float64 PEFT maths (scale * B(A x)) on the layouts the decoder hands it: y one
    part of a grouped q/k/v output (rows 2560 floats apart), rows on their own adapters (run in parallel)
    and a row with two adapters (serial). float32 accumulation over K=256 then r=8: 1e-5 of the scale."""
    from qadapt.quant.native import lora_plan

    g = torch.Generator().manual_seed(0)
    K, N, r = 256, 96, 8
    x = torch.randn(4, K, generator=g)
    facts = [(torch.randn(r, K, generator=g) / 16, torch.randn(r, N, generator=g) / 4, s) for s in (2.0, 0.37)]
    for rows in ([(0, 0), (1, 1), (2, 0), (3, 1)], [(0, 0), (0, 1), (2, 1)]):
        grouped = torch.randn(4, 2 * N + 64, generator=g)
        want = grouped.double().clone()
        for row, k in rows:
            A, Bt, s = facts[k]
            want[row, 64:64 + N] += s * ((x[row].double() @ A.double().T) @ Bt.double())
        y = grouped[:, 64:64 + N]  # a strided view, updated in place
        assert not y.is_contiguous()
        LIB.lora_rows(y, x, lora_plan([(row, *facts[k]) for row, k in rows]))
        torch.testing.assert_close(grouped.double(), want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_native_plans_outside_their_bounds_are_refused_unwritten():
    """The C side checks every LoRA plan entry against the call's rows, output columns and input width, and a
    decode step's positions against its caches: a bad plan is a ValueError and nothing is written."""
    from qadapt.quant.native import lora_plan

    g = torch.Generator().manual_seed(1)
    K, N, r = 64, 16, 4
    x = torch.randn(2, K, generator=g)
    A, Bt = torch.randn(r, K, generator=g), torch.randn(r, N, generator=g)
    bad = {"a row past the input": [(2, A, Bt, 1.0)],
           "outputs past the row": [(0, A, Bt, 1.0, 8)],
           "factors for another width": [(0, torch.randn(r, K + 32, generator=g), Bt, 1.0)],
           "a rank above 256": [(0, torch.randn(300, K, generator=g), torch.randn(300, N, generator=g), 1.0)]}
    for what, entries in bad.items():
        y = torch.zeros(2, N)
        with pytest.raises(ValueError, match="refused its plan"):
            LIB.lora_rows(y, x, lora_plan(entries))
        assert not y.any(), what
    h, kv, d = 2, 1, 8
    q, k, v = torch.randn(1, h * d), torch.randn(1, kv * d), torch.randn(1, kv * d)
    kc = vc = torch.zeros(1, kv, 4, d)
    cos, sin = torch.ones(1, d), torch.zeros(1, d)
    with pytest.raises(ValueError, match="refused"):  # position 4 of a 4-slot cache
        LIB.attn_decode(q, k, v, cos, sin, kc, vc, torch.tensor([4]), torch.tensor([0]), h, kv, d)
    assert not kc.any()


@pytest.mark.parametrize("rep", [1, 4, 8])
def test_native_attention_at_long_contexts_matches_torch(rep):
    """The decode step's attention core past 512 keys, where grouped queries read each kv head's keys and
    values once per group (tiles of 256 keys): two rows at different depths (700 and 1500 keys, one in a
    sliding window from key 300), head dim 64, against torch's softmax(q k^T / sqrt(d)) v on the same cache
    (rotation off: cos 1, sin 0). Tolerance 1e-5 of the output's scale: float32 in another order."""
    if LIB is None or not LIB.simd:
        pytest.skip("needs the native AVX2 kernels")
    g = torch.Generator().manual_seed(7)
    kv, d = 2, 64
    h, S = kv * rep, 1600
    pos, first = torch.tensor([699, 1499]), torch.tensor([0, 300])
    kc, vc = torch.randn(2, kv, S, d, generator=g), torch.randn(2, kv, S, d, generator=g)
    q, k, v = torch.randn(2, h * d, generator=g), torch.randn(2, kv * d, generator=g), torch.randn(2, kv * d, generator=g)
    cos, sin = torch.ones(2, d), torch.zeros(2, d)
    got = LIB.attn_decode(q.clone(), k.clone(), v.clone(), cos, sin, kc, vc, pos, first, h, kv, d)
    for b in range(2):
        p, f = int(pos[b]), int(first[b])
        assert torch.equal(kc[b, :, p], k[b].view(kv, d)) and torch.equal(vc[b, :, p], v[b].view(kv, d))
        keys, vals = kc[b, :, f:p + 1].double(), vc[b, :, f:p + 1].double()  # [kv, n, d]
        qh = q[b].view(h, d).double()
        for j in range(h):
            w = torch.softmax(keys[j // rep] @ qh[j] / d ** 0.5, 0)
            want = w @ vals[j // rep]
            out = got[b].view(h, d)[j].double()
            assert float((out - want).abs().max()) <= 1e-5 * float(want.abs().max()), (b, j)
