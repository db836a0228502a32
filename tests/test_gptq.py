"""GPTQ bases against the GPTQ ecosystem, transformers and PEFT.

References:
- packing: the formulas of GPTQ's ``pack`` (auto-gptq ``QuantLinear.pack``, identical in
  GPTQModel 7.6 ``PackableQuantLinear.pack_original``), re-written below in numpy loops;
  and, where GPTQModel is installed, GPTQModel itself (its packer must produce the same
  bytes, its ``TorchLinear.dequantize_weight`` the same weights);
- dequantization: GPTQ's ``scales[g_idx] * (q - zeros[g_idx])`` (GPTQModel's
  ``_dequantize_from_codes``), zeros read +1 in checkpoint format ``gptq`` (v1);
- logits: transformers' modeling code with those dequantized weights; adapters: PEFT over it.

Tolerances (stated per test): dequantization is exact (an fp16 scale times an integer below
2**9 is a float32); the float32 blockwise path agrees with ``x @ W.T`` to float32 summation
order; the int4 kernel path rounds x, scales and zeros to bf16 (see test_quant_ggml).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qadapt
from qadapt.errors import FormatError, InputError, QadaptError, UnsupportedError
from qadapt.quant.gptq import GPTQLinear

from models import tiny_arch, tiny_hf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(3))

#: (bits, group_size, sym, act_order, checkpoint_format): the configurations the issue names.
CONFIGS = {
    "4bit-actorder-asym-v1": (4, 32, False, True, "gptq"),
    "4bit-sym-v2": (4, -1, True, False, "gptq_v2"),
    "8bit": (8, 32, False, False, "gptq"),
    "3bit": (3, 32, False, True, "gptq"),
}


# --------------------------------------------------------------------------- reference packing
def ref_pack_rows(iw: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ ``pack`` of int codes [in, out] along the rows (its loops, verbatim in numpy)."""
    iw = iw.astype(np.uint32)
    q = np.zeros((iw.shape[0] * bits // 32, iw.shape[1]), dtype=np.uint32)
    if bits in (2, 4, 8):
        pf = 32 // bits
        for row in range(q.shape[0]):
            for j in range(pf):
                q[row] |= iw[row * pf + j] << (bits * j)
        return q.astype(np.int32)
    i = row = 0  # bits == 3: 32 values in three words, values 10 and 21 straddling words
    while row < q.shape[0]:
        for j in range(i, i + 10):
            q[row] |= iw[j] << (3 * (j - i))
        i += 10
        q[row] |= iw[i] << 30
        row += 1
        q[row] |= (iw[i] >> 2) & 1
        i += 1
        for j in range(i, i + 10):
            q[row] |= iw[j] << (3 * (j - i) + 1)
        i += 10
        q[row] |= iw[i] << 31
        row += 1
        q[row] |= (iw[i] >> 1) & 0x3
        i += 1
        for j in range(i, i + 10):
            q[row] |= iw[j] << (3 * (j - i) + 2)
        i += 10
        row += 1
    return q.astype(np.int32)


def ref_pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's qzeros packing: the same loops along the columns."""
    return ref_pack_rows(z.T, bits).T.copy()


def rtn_quantize(w: torch.Tensor, bits: int, group: int, sym: bool, act_order: bool, seed: int):
    """Round-to-nearest GPTQ quantization of ``w`` [out, in] with GPTQ's quantizer formulas
    (``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``; sym: ``xmax = max|x|``,
    ``zero = (maxq + 1) / 2``). Act-order: a random column permutation decides the groups
    (``g_idx[perm[i]] = i // group``), as GPTQ's desc_act does with the Hessian order.

    Asymmetric zeros are kept in [1, maxq]: v1 stores ``zero - 1`` and a stored -1 is where
    auto-gptq's own writer and GPTQModel's word-wise v1 conversion disagree.
    Returns codes [in, out] int, scales fp16 [G, out], zeros int [G, out], g_idx [in].
    """
    out_f, in_f = w.shape
    g = in_f if group == -1 else group
    maxq = 2 ** bits - 1
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(in_f, generator=gen) if act_order else torch.arange(in_f)
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // g).to(torch.int32)
    n_groups = in_f // g
    scales = torch.empty(n_groups, out_f, dtype=torch.float16)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int64)
    for k in range(n_groups):
        cols = w[:, g_idx == k]
        xmin, xmax = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        s = ((xmax - xmin) / maxq).clamp(min=1e-5)
        scales[k] = s.half()
        zeros[k] = torch.full_like(xmin, (maxq + 1) // 2) if sym else torch.round(-xmin / s).clamp(1, maxq)
    sg, zg = scales.float()[g_idx.long()], zeros[g_idx.long()]  # [in, out]
    codes = torch.round(w.T / sg + zg).clamp(0, maxq).to(torch.int64)
    return codes, scales, zeros, g_idx


def ref_dequantize(codes, scales, zeros, g_idx) -> torch.Tensor:
    """GPTQ's ``scales[g_idx] * (q - zeros[g_idx])`` -> float32 [out, in]."""
    g = g_idx.long()
    return (scales.float()[g] * (codes - zeros[g]).float()).T.contiguous()


def gptq_tensors(w: torch.Tensor, bits, group, sym, act_order, fmt, seed=0):
    """(checkpoint tensors, reference dequantized weight) of ``w`` quantized and packed."""
    codes, scales, zeros, g_idx = rtn_quantize(w, bits, group, sym, act_order, seed)
    stored = zeros - 1 if fmt == "gptq" else zeros
    t = {
        "qweight": torch.from_numpy(ref_pack_rows(codes.numpy(), bits)),
        "qzeros": torch.from_numpy(ref_pack_cols(stored.numpy(), bits)),
        "scales": scales,
        "g_idx": g_idx,
    }
    return t, ref_dequantize(codes, scales, zeros, g_idx), (codes, scales, zeros)


# --------------------------------------------------------------------------- layer tests
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dequantize_matches_gptq_formula(name):
    """Reference: GPTQ's dequantization formula on the codes GPTQ's pack formulas packed.
    Tolerance none: every value is an fp16 scale times a small integer, exact in float32."""
    bits, group, sym, act, fmt = CONFIGS[name]
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    t, ref, _ = gptq_tensors(w, bits, group, sym, act, fmt)
    layer = GPTQLinear(**t, bits=bits, group_size=group, checkpoint_format=fmt)
    assert (layer.out_features, layer.in_features) == (64, 96)
    assert torch.equal(layer.dequantize(), ref)
    assert float((ref - w).abs().max()) < 0.6 * float(w.abs().max())  # it is a quantization of w


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_dequantized(name):
    """Reference: x @ W.T with W from GPTQ's formula, float64.

    blockwise (2/3/8 bits): float32 maths, tolerance 1e-5 relative to |x| @ |W|.T.
    int4pack (4 bits): x, scale and scale * (8 - z) rounded to bf16 (2**-9 relative each) and
    y rounded to bf16: |err| <= 2**-8 * (|x| @ A.T) + 2**-8 |y| with A = 8|s| + |s (8 - z)|
    (as test_quant_ggml's int4 bound); plus cosine > 0.9999. Act-order runs the kernel on
    permuted columns: the same bound holds."""
    bits, group, sym, act, fmt = CONFIGS[name]
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=gen)
    t, ref, (codes, scales, zeros) = gptq_tensors(w, bits, group, sym, act, fmt)
    bias = torch.randn(64, generator=gen)
    layer = GPTQLinear(**t, bias=bias, bits=bits, group_size=group, checkpoint_format=fmt)
    assert layer.path == ("int4pack" if bits == 4 else "blockwise")
    x = torch.randn(2, 3, 128, generator=gen)
    y = layer(x).double()
    want = x.double() @ ref.double().T + bias.double()
    mag = x.double().abs() @ ref.double().abs().T
    if bits != 4:
        assert ((y - want).abs() <= 1e-5 * mag + 1e-6).all()
        return
    g = t["g_idx"].long()
    s = scales.double()[g]
    a = (8 * s + (s * (8 - zeros[g])).abs()).T  # [out, in]
    bound = 2 ** -8 * 1.01 * (x.double().abs() @ a.T) + 2 ** -8 * want.abs() + 1e-6
    assert ((y - want).abs() <= bound).all()
    assert (torch.nn.functional.cosine_similarity(y.reshape(-1, 64), want.reshape(-1, 64), dim=-1) > 0.9999).all()


def test_int4pack_long_inputs_and_odd_shapes_go_blockwise(monkeypatch):
    """More rows than the kernel's batch limit: blockwise bf16; out_features not a multiple of 16:
    blockwise float32 (reference x @ W.T, tolerances as above: bf16 2**-7 relative, float32 1e-5)."""
    from qadapt.quant import kernels

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 64, generator=gen)
    t, ref, _ = gptq_tensors(w, 4, 32, False, False, "gptq")
    layer = GPTQLinear(**t, bits=4, group_size=32)
    assert layer.path == "blockwise"  # 40 rows: not a multiple of 16
    x = torch.randn(5, 64, generator=gen)
    assert ((layer(x) - x @ ref.T).abs() <= 1e-5 * (x.abs() @ ref.abs().T) + 1e-6).all()
    w = torch.randn(32, 64, generator=gen)
    t, ref, _ = gptq_tensors(w, 4, 32, False, True, "gptq")
    layer = GPTQLinear(**t, bits=4, group_size=32)
    monkeypatch.setattr(kernels, "INT4PACK_MAX_BATCH", 2)
    x = torch.randn(5, 64, generator=gen)
    y, want = layer(x).double(), (x @ ref.T).double()
    assert ((y - want).abs() <= 2 ** -7 * (x.double().abs() @ ref.double().abs().T) + 1e-6).all()


def test_bad_tensors_are_format_errors():
    """Shapes that do not fit the config name the layer; unknown bits / formats are refused."""
    t, _, _ = gptq_tensors(torch.randn(32, 64), 4, 32, False, False, "gptq")
    with pytest.raises(FormatError, match="blk.0.q.*qzeros"):
        GPTQLinear(t["qweight"], t["qzeros"][:, :2], t["scales"], None, bits=4, group_size=32, name="blk.0.q")
    with pytest.raises(FormatError, match="g_idx"):
        GPTQLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"] + 5, bits=4, group_size=32)
    with pytest.raises(UnsupportedError, match="bits=5"):
        GPTQLinear(t["qweight"], t["qzeros"], t["scales"], None, bits=5, group_size=32)
    with pytest.raises(UnsupportedError, match="marlin"):
        GPTQLinear(t["qweight"], t["qzeros"], t["scales"], None, bits=4, group_size=32, checkpoint_format="marlin")


# --------------------------------------------------------------------------- GPTQModel cross-check
_GPTQMODEL_SCRIPT = r"""
import os, sys, torch
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.quantization.config import QuantizeConfig
from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
cases = torch.load(sys.argv[1], weights_only=True)
out = {}
for name, c in cases.items():
    bits, group, sym, act = c["cfg"].tolist()
    in_f, out_f = c["codes"].shape
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    g = c["g_idx"].long()
    with torch.no_grad():  # a weight whose rounding gives exactly these codes
        lin.weight.copy_((c["scales"].float()[g] * (c["codes"] - c["zeros"][g]).float()).T)
    q = TorchLinear(bits=bits, group_size=group, sym=bool(sym), desc_act=bool(act), in_features=in_f,
                    out_features=out_f, bias=False)
    # GPTQModel's pack takes scales / zeros per input column group as [out, groups]
    q.pack_original(lin, c["scales"].float().T.contiguous(), c["zeros"].T.contiguous(), c["g_idx"].int())
    q._init_wf_unsqueeze_buffers()  # post_init's unpack tables, without its torch.compile step
    q.eval()
    deq = q.dequantize_weight().T.contiguous()
    v2 = q.qzeros.clone()
    convert_gptq_v2_to_v1_format_module(q, QuantizeConfig(bits=bits, group_size=group, sym=bool(sym), desc_act=bool(act)))
    out[name] = {"qweight": q.qweight.clone(), "qzeros_v2": v2, "qzeros_v1": q.qzeros.clone(), "deq": deq}
torch.save(out, sys.argv[2])
"""


def test_packing_and_dequantization_match_gptqmodel(tmp_path):
    """Reference: GPTQModel 7.6 (``TorchLinear.pack_original``, ``convert_gptq_v2_to_v1_format_module``,
    ``dequantize_weight``) on the same codes, in a subprocess (it writes ``logs/`` in its working
    directory and takes ~20 s to import). Packed bytes: equal. Dequantized weights: GPTQModel
    computes in fp16, so ours rounded to fp16 must equal its weights bit for bit."""
    pytest.importorskip("gptqmodel", reason="GPTQModel is optional (pip install 'qadapt[gptq]')")
    cases, ours = {}, {}
    for name, (bits, group, sym, act, fmt) in CONFIGS.items():
        w = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
        t, _, (codes, scales, zeros) = gptq_tensors(w, bits, group, sym, act, fmt)
        cases[name] = {"cfg": torch.tensor([bits, group, sym, act]), "codes": codes, "scales": scales,
                       "zeros": zeros, "g_idx": t["g_idx"]}
        ours[name] = (t, GPTQLinear(**t, bits=bits, group_size=group, checkpoint_format=fmt).dequantize())
    torch.save(cases, tmp_path / "in.pt")
    script = tmp_path / "ref.py"
    script.write_text(_GPTQMODEL_SCRIPT)
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, (bits, group, sym, act, fmt) in CONFIGS.items():
        t, deq = ours[name]
        assert torch.equal(ref[name]["qweight"], t["qweight"]), name
        assert torch.equal(ref[name]["qzeros_v1" if fmt == "gptq" else "qzeros_v2"], t["qzeros"]), name
        assert torch.equal(deq.half(), ref[name]["deq"].half()), name


# --------------------------------------------------------------------------- checkpoints
def write_gptq_folder(model, path: Path, name: str, dynamic: dict | None = None, where: str = "both"):
    """Save ``model`` as a GPTQ checkpoint of configuration ``name`` (the transformers / GPTQModel
    layout: block linears replaced by qweight/qzeros/scales/g_idx, everything else as saved by
    transformers); returns the transformers reference whose linears hold GPTQ's dequantization.
    ``dynamic`` (GPTQModel's per-module overrides) is honoured: ``-:`` modules stay dense."""
    import re

    from safetensors.torch import save_file

    bits, group, sym, act, fmt = CONFIGS[name]
    ref = copy.deepcopy(model)
    model.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    ref_sd = ref.state_dict()
    for i, key in enumerate(sorted(sd)):
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        b, neg = bits, False
        for pat, over in (dynamic or {}).items():
            if re.match(pat.removeprefix("-:").removeprefix("+:"), module):
                neg, b = pat.startswith("-:"), over.get("bits", bits)
                break
        if neg:
            continue
        t, deq, _ = gptq_tensors(sd.pop(key), b, group, sym, act, fmt, seed=i)
        sd.update({f"{module}.{k}": v for k, v in t.items()})
        with torch.no_grad():
            ref_sd[key].copy_(deq)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    qc = {"bits": bits, "group_size": group, "desc_act": act, "sym": sym, "checkpoint_format": fmt,
          "quant_method": "gptq", "pack_dtype": "int32", "lm_head": False}
    if dynamic:
        qc["dynamic"] = dynamic
    if where in ("both", "quantize_config"):
        (path / "quantize_config.json").write_text(json.dumps(qc))
    if where in ("both", "config"):
        cfg = json.loads((path / "config.json").read_text())
        cfg["quantization_config"] = qc
        (path / "config.json").write_text(json.dumps(cfg))
    return ref


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache = {}

    def get(arch: str, name: str):
        if (arch, name) not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{name}")
            hf = tiny_hf(arch, seed=1) if arch in ("llama", "qwen2") else tiny_arch(arch, seed=1)
            cache[arch, name] = path, write_gptq_folder(hf, path, name)
        return cache[arch, name]

    return get


def _tol(name: str, mode: str, want: torch.Tensor) -> float:
    """dequantize mode and the float32 blockwise path: same float32 weights as the reference,
    summation order only (1e-4 on logits ~1). The int4 kernel: bf16 activations and scales,
    as test_gguf_runtime's INT4 types: 2% of the logit range (observed 0.3%)."""
    if mode == "dequantize" or CONFIGS[name][0] != 4:
        return 1e-4
    return 0.02 * float(want.abs().max())


@pytest.mark.parametrize("mode", ["inplace", "dequantize"])
@pytest.mark.parametrize("arch,name", [("llama", n) for n in CONFIGS] + [
    (a, "4bit-actorder-asym-v1") for a in ("qwen2", "qwen3", "gemma2", "gemma3_text")])
def test_logits_match_transformers(folders, arch, name, mode):
    """Reference: transformers' modeling code with GPTQ's dequantized weights (tolerance: _tol)."""
    path, ref = folders(arch, name)
    m = qadapt.load(path, mode=mode)
    assert m.base_format == "gptq" and m.base_format_quant == f"gptq-{CONFIGS[name][0]}bit"
    with torch.no_grad():
        want = ref(IDS).logits
    got = m.logits(IDS)
    assert float((got - want).abs().max()) <= _tol(name, mode, want)
    if mode == "inplace":
        q = m.decoder.blocks[0].linears["q"]
        assert isinstance(q, GPTQLinear) and q.path == ("int4pack" if CONFIGS[name][0] == 4 else "blockwise")


@pytest.mark.parametrize("mode", ["inplace", "dequantize"])
@pytest.mark.parametrize("arch,name", [("llama", "4bit-actorder-asym-v1"), ("llama", "3bit")] + [
    (a, "4bit-actorder-asym-v1") for a in ("qwen2", "qwen3", "gemma2", "gemma3_text")])
def test_lora_on_gptq_matches_peft(folders, tmp_path, arch, name, mode):
    """Reference: PEFT LoRA (all linears + lm_head, rsLoRA) over transformers on the dequantized weights;
    the adapter delta is float32 on top of the quantized output, so the tolerance is the base's (_tol)."""
    import peft

    path, ref = folders(arch, name)
    torch.manual_seed(5)
    pm = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS + ["lm_head"], init_lora_weights=False, use_rslora=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5)
    pm.save_pretrained(tmp_path / "ad")
    pm.eval()
    with torch.no_grad():
        want = pm(IDS).logits
        base = ref(IDS).logits
    m = qadapt.load(path, mode=mode, adapters={"a": str(tmp_path / "ad")})
    tol = _tol(name, mode, want)
    assert float((m.logits(IDS) - want).abs().max()) <= tol
    assert float((want - base).abs().max()) > 4 * tol  # the adapter matters at this tolerance


def test_dynamic_overrides_and_config_json_only(tmp_path):
    """GPTQModel's ``dynamic``: ``+:`` rules override bits per module (first match wins), ``-:`` rules
    leave a module dense; settings only in config.json's quantization_config. Reference: transformers
    on the dequantized weights, tolerance as the 4-bit kernel (_tol)."""
    from qadapt.quant.base import DenseLinear

    dynamic = {r"-:model\.layers\.1\.mlp\.down_proj": {}, r"+:.*\.mlp\.": {"bits": 8}}
    ref = write_gptq_folder(tiny_hf("llama", seed=2), tmp_path, "4bit-sym-v2", dynamic=dynamic, where="config")
    m = qadapt.load(tmp_path)
    lin0, lin1 = m.decoder.blocks[0].linears, m.decoder.blocks[1].linears
    assert lin0["q"].qtype == "gptq-4bit" and lin0["gate"].qtype == "gptq-8bit"
    assert isinstance(lin1["down"], DenseLinear) and lin1["up"].qtype == "gptq-8bit"
    assert m.file_info["quant_config"]["dynamic"]
    with torch.no_grad():
        want = ref(IDS).logits
    assert float((m.logits(IDS) - want).abs().max()) <= _tol("4bit-sym-v2", "inplace", want)


def test_refusals(tmp_path, folders):
    """quant='gptq-4bit' is not quantize-on-load; a GPTQ folder refuses a second quantization;
    unsupported checkpoint formats and pack dtypes are named."""
    path, _ = folders("llama", "8bit")
    with pytest.raises(InputError, match="already quantized"):
        qadapt.load(path, quant="nf4")
    plain = tmp_path / "plain"
    tiny_hf("llama").save_pretrained(plain)
    with pytest.raises(UnsupportedError, match="calibration"):
        qadapt.load(plain, quant="gptq-4bit")
    for key, value, match in (("checkpoint_format", "marlin", "marlin"), ("pack_dtype", "int16", "int16"),
                              ("bits", 5, "`bits` must be 2, 3, 4 or 8, got 5")):
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        for f in path.iterdir():
            (bad / f.name).symlink_to(f) if f.name != "quantize_config.json" else None
        qc = json.loads((path / "quantize_config.json").read_text())
        qc[key] = value
        (bad / "quantize_config.json").write_text(json.dumps(qc))
        with pytest.raises(QadaptError, match=match):
            qadapt.load(bad)


def test_inspect_reports_gptq_config_and_layer_bytes(folders):
    """``qadapt inspect`` (describe) on a GPTQ folder: the settings and, per linear, the bytes of its
    tensors as the safetensors header states them (reference: the tensors' own sizes)."""
    from safetensors.torch import load_file

    from qadapt.inspect import describe

    path, _ = folders("llama", "4bit-actorder-asym-v1")
    d = describe(str(path))
    assert d["format"] == "gptq" and d["quantization"]["bits"] == 4 and d["quantization"]["desc_act"] is True
    sd = load_file(str(path / "model.safetensors"))
    row = next(r for r in d["layers"] if r["path"] == "model.layers.0.mlp.down_proj")
    want = sum(v.numel() * v.element_size() for k, v in sd.items() if k.startswith("model.layers.0.mlp.down_proj."))
    assert row["qtype"] == "gptq-4bit" and row["bytes"] == want
    assert next(r for r in d["layers"] if r["path"] == "lm_head")["qtype"] == "F32"
