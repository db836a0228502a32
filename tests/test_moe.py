"""Mixture-of-experts bases (Mixtral, Qwen3-MoE) with LoRA on every kind of module, against transformers and PEFT.

Bases: the real checkpoints' configs (tests/real_configs.py: mixtral-8x7b, qwen3-30b-a3b, sizes shrunk), as a
transformers folder and as GGUF written by llama.cpp's converter at Q8_0 (merged [experts, out, in] tensors,
the router kept F32); their logits are tested in tests/test_real_configs.py.

Adapters, in the three layouts PEFT 0.21.2 reads on transformers 5's merged experts, each with LoRA on the
attention and on the experts:
- ``legacy``: per-expert modules (``...experts.3.w1``), as every adapter trained before transformers 5; written
  here tensor by tensor, the layout's documented names;
- ``converted``: PEFT's own ``get_peft_model(target_modules=[..., "w1", "w2", "w3"])`` on transformers 5, which
  converts the expert targets to ``target_parameters`` on the merged weights (rank doubled, block-diagonal B);
- ``parameters``: ``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``, PEFT's
  ``ParamWrapper`` layout.
Reference: PEFT's ``PeftModel.from_pretrained`` (which converts the legacy layout itself) on transformers' model,
with gguf-py's dequantization of the file's tensors for the GGUF base. LoRA on the router, which PEFT cannot put
on transformers 5's router (a bare parameter), is compared with transformers' model holding the merged weight.

Tolerance: float32 on both sides over the same weights, in another summation order: 1e-4 on logits of
magnitude ~1 (observed <= 4e-7); each adapter moves the logits by > 0.1. A token whose two best experts nearly
tie could route differently under that rounding; none does on these seeds (a wrong routing moves logits ~0.1).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import qadapt
from qadapt.errors import AdapterError, InputError, UnsupportedError
from device_marks import require
from real_configs import build, convert, dequantized_model, save

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::RuntimeWarning")

IDS = torch.tensor([[1, 17, 250, 31, 77, 5, 299, 120, 64, 3, 45, 9], [7, 300, 12, 88, 150, 2, 61, 19, 230, 4, 5, 6]])
MOE = {"mixtral-8x7b": ("mixtral", "LLAMA", ["w1", "w2", "w3"]),
       "qwen3-30b-a3b": ("qwen3_moe", "QWEN3MOE", ["gate_proj", "up_proj", "down_proj"])}


def _experts(hf):
    """(blocks, experts, hidden, expert width) of a transformers 5 MoE model."""
    c = hf.config
    width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    return c.num_hidden_layers, c.num_local_experts, c.hidden_size, width


def legacy_adapter(hf, name: str, folder: Path, seed: int, router: bool = False) -> Path:
    """A per-expert adapter as PEFT wrote them before transformers 5 (q_proj, v_proj and every expert module;
    the router too with ``router``)."""
    from safetensors.torch import save_file

    lm_name, _, roles = MOE[name]
    layers, n_exp, hidden, width = _experts(hf)
    moe = "block_sparse_moe" if lm_name == "mixtral" else "mlp"
    c = hf.config
    hd = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    g = torch.Generator().manual_seed(seed)
    sd, r = {}, 4
    mods = {"self_attn.q_proj": (hidden, q), "self_attn.v_proj": (hidden, kv)}
    if router:
        mods[f"{moe}.gate"] = (hidden, n_exp)
    for e in range(n_exp):
        down = roles[1] if lm_name == "mixtral" else roles[2]
        for w in roles:
            mods[f"{moe}.experts.{e}.{w}"] = (width, hidden) if w == down else (hidden, width)
    for i in range(layers):
        for m, (fin, fout) in mods.items():
            key = f"base_model.model.model.layers.{i}.{m}"
            sd[f"{key}.lora_A.weight"] = torch.randn(r, fin, generator=g) * 0.2
            sd[f"{key}.lora_B.weight"] = torch.randn(fout, r, generator=g) * 0.2
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    targets = ["q_proj", "v_proj", *roles] + (["gate"] if router else [])
    (folder / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=8, target_modules=targets, bias="none",
        lora_dropout=0.0, fan_in_fan_out=False)))
    return folder


def peft_adapter(hf, name: str, folder: Path, seed: int, layout: str) -> Path:
    import peft

    roles = MOE[name][2]
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False)
    if layout == "converted":
        kw["target_modules"] = ["q_proj", "v_proj", *roles]
    else:
        kw.update(target_modules=["q_proj", "v_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5)
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(llama_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    out, jobs = {}, []
    for name in MOE:
        cfg, hf = build(name, seed=3)
        folder = save(hf, cfg, d / name)
        jobs.append((save(hf, cfg, d / f"{name}-convert"), d / f"{name}.q8_0.gguf", "q8_0"))  # + a tokenizer
        adapters = {"legacy": legacy_adapter(hf, name, d / f"{name}-legacy", 1)}
        for i, layout in enumerate(("converted", "parameters")):
            adapters[layout] = peft_adapter(hf, name, d / f"{name}-{layout}", 2 + i, layout)
        out[name] = (hf, folder, adapters)
    convert(llama_root, jobs)
    return d, out


def _peft(ref, folder: Path, ids=IDS) -> torch.Tensor:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(folder)).eval()
    with torch.no_grad():
        return pm(ids).logits


@pytest.mark.parametrize("base", ["hf", "gguf-q8_0"])
@pytest.mark.parametrize("layout", ["legacy", "converted", "parameters"])
@pytest.mark.parametrize("name", sorted(MOE))
def test_expert_lora_matches_peft(world, name, layout, base):
    d, models = world
    hf, folder, adapters = models[name]
    path = folder if base == "hf" else d / f"{name}.q8_0.gguf"
    ref = hf if base == "hf" else dequantized_model(hf, path, MOE[name][1])
    m = qadapt.load(path)
    m.load_adapter("a", adapters[layout], activate=True)
    want = _peft(ref, adapters[layout])
    with torch.no_grad():
        moved = float((want - ref(IDS).logits).abs().max())
    assert moved > 0.1, moved
    torch.testing.assert_close(m.logits(IDS), want, atol=1e-4, rtol=1e-5)
    experts = [p for p in m.adapters["a"].factors if ".experts." in p]
    n_exp = hf.config.num_local_experts
    assert len(experts) == hf.config.num_hidden_layers * n_exp * 3, len(experts)


@pytest.mark.parametrize("where", ["triton", "cuda"])
@pytest.mark.parametrize("name", sorted(MOE))
def test_experts_on_the_device_path(world, name, where):
    """A llama.cpp-converted MoE GGUF on the device path (each expert's slice of the merged ``ffn_*_exps`` tensors
    through the Triton kernels, the expert LoRAs in slots, rows routed per token) against PEFT over the
    dequantized model; a second row without the adapter against the model alone. Tolerances as
    tests/test_triton.py: the exact path's 1e-4 on the interpreter, 2e-3 of the logit scale on CUDA."""
    kw = require(where)
    d, models = world
    hf, _, adapters = models[name]
    path = d / f"{name}.q8_0.gguf"
    ref = dequantized_model(hf, path, MOE[name][1])
    m = qadapt.load(path, adapters={"a": str(adapters["parameters"])}, activate=[], **kw)
    cache = m.new_cache(16, batch=2)
    got = m.step(IDS, torch.arange(12).expand(2, 12), cache, rows=(("a",), ()))
    want = torch.stack([_peft(ref, adapters["parameters"], IDS[:1])[0, -1], ref(IDS[1:]).logits.detach()[0, -1]])
    tol = 1e-4 if where == "triton" else 2e-3 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol


def test_rows_with_different_adapters_in_one_batch(world):
    """Per-row adapters (the server's batches) through the experts: each expert runs on the tokens routed to it,
    each with its own row's adapter; every row equals PEFT with its adapter alone, prefill and a decode step."""
    _, models = world
    hf, folder, adapters = models["qwen3-30b-a3b"]
    m = qadapt.load(folder)
    names = ("legacy", "parameters")
    for n in names:
        m.load_adapter(n, adapters[n])
    rows = (("legacy",), ("parameters",), ())
    ids = torch.cat([IDS, IDS[:1]])
    nxt = torch.tensor([[40], [41], [42]])
    cache = m.new_cache(16, batch=3)
    first = m.step(ids, torch.arange(12).expand(3, 12), cache, rows)
    second = m.step(nxt, torch.full((3, 1), 12), cache, rows)
    for i, r in enumerate(rows):
        full = torch.cat([ids[i:i + 1], nxt[i:i + 1]], 1)
        want = _peft(hf, adapters[r[0]], full) if r else hf(full).logits.detach()
        torch.testing.assert_close(first[i], want[0, 11], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(second[i], want[0, 12], atol=1e-4, rtol=1e-5)


def test_router_lora_matches_the_merged_router(world, tmp_path):
    """LoRA on the router (legacy `gate` target; transformers 5's router is a bare parameter PEFT cannot wrap):
    against transformers with W + scale * B @ A in the router and every other module's LoRA merged likewise."""
    from safetensors.torch import load_file

    _, models = world
    hf, folder, _ = models["mixtral-8x7b"]
    ad = legacy_adapter(hf, "mixtral-8x7b", tmp_path / "router", 5, router=True)
    sd = load_file(str(ad / "adapter_model.safetensors"))
    ref = copy.deepcopy(hf)
    layers, n_exp, _, width = _experts(hf)

    def delta(key):
        p = f"base_model.model.model.layers.{key}"
        return 2.0 * sd[f"{p}.lora_B.weight"] @ sd[f"{p}.lora_A.weight"]  # lora_alpha 8 / r 4

    with torch.no_grad():
        for i in range(layers):
            blk = ref.model.layers[i]
            blk.self_attn.q_proj.weight += delta(f"{i}.self_attn.q_proj")
            blk.self_attn.v_proj.weight += delta(f"{i}.self_attn.v_proj")
            blk.mlp.gate.weight += delta(f"{i}.block_sparse_moe.gate")
            for e in range(n_exp):
                blk.mlp.experts.gate_up_proj[e, :width] += delta(f"{i}.block_sparse_moe.experts.{e}.w1")
                blk.mlp.experts.gate_up_proj[e, width:] += delta(f"{i}.block_sparse_moe.experts.{e}.w3")
                blk.mlp.experts.down_proj[e] += delta(f"{i}.block_sparse_moe.experts.{e}.w2")
        want = ref(IDS).logits
    m = qadapt.load(folder)
    m.load_adapter("r", ad, activate=True)
    assert "model.layers.0.block_sparse_moe.gate" in m.adapters["r"].factors
    torch.testing.assert_close(m.logits(IDS), want, atol=1e-4, rtol=1e-5)


def test_unrenormalised_routing_follows_the_config(tmp_path):
    """`norm_topk_prob: false` (the top-k softmax weights as they are) against transformers; GGUF has no form for it
    (llama.cpp renormalises every qwen3moe model), so writing one is refused."""
    from qadapt.layer_maps import get_layer_map
    from qadapt.models.gguf_export import export_gguf
    from real_configs import config

    cfg, hf = build("qwen3-30b-a3b", seed=4, norm_topk_prob=False)
    folder = save(hf, cfg, tmp_path / "m")
    m = qadapt.load(folder)
    assert m.config.norm_topk is False
    with torch.no_grad():
        want = hf(IDS).logits
        hf.config.norm_topk_prob = True
        for layer in hf.model.layers:
            layer.mlp.gate.norm_topk_prob = True
        renormalised = hf(IDS).logits
    assert float((want - renormalised).abs().max()) > 1e-2  # the flag matters on these weights
    torch.testing.assert_close(m.logits(IDS), want, atol=1e-4, rtol=1e-5)
    with pytest.raises(InputError, match="norm_topk_prob"):
        export_gguf(m_state(folder), config("qwen3-30b-a3b", norm_topk_prob=False), get_layer_map("qwen3_moe"),
                    tmp_path / "m.gguf")


def m_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_dense_layers_among_experts_are_refused(tmp_path):
    cfg, hf = build("qwen3-30b-a3b", seed=4)
    folder = save(hf, {**cfg, "mlp_only_layers": [1]}, tmp_path / "m")
    with pytest.raises(UnsupportedError, match="mlp_only_layers"):
        qadapt.load(folder)


def test_bad_expert_adapters_are_refused_by_name(world, tmp_path):
    """An expert index past the base's, merged-expert factors of the wrong shape, `target_parameters` on a dense
    base: each a clear error naming the module."""
    from safetensors.torch import load_file, save_file

    _, models = world
    hf, folder, adapters = models["mixtral-8x7b"]
    m = qadapt.load(folder)
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(str(adapters["legacy"] / "adapter_model.safetensors"))
    sd = {k.replace("experts.7.", "experts.9."): v for k, v in sd.items()}
    save_file(sd, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((adapters["legacy"] / "adapter_config.json").read_text())
    with pytest.raises((AdapterError, InputError), match="experts.9"):
        m.load_adapter("bad", bad)
    short = tmp_path / "short"
    short.mkdir()
    sd = load_file(str(adapters["parameters"] / "adapter_model.safetensors"))
    sd = {k: ((v[:-1] if "lora_A" in k else v[:, :-1]) if "experts" in k else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(short / "adapter_model.safetensors"))
    (short / "adapter_config.json").write_text((adapters["parameters"] / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match=r"mlp\.experts.*fit no merged expert parameter"):
        m.load_adapter("short", short)
    cfg, dense = build("llama-3.2-1b")
    with pytest.raises(AdapterError, match="target_parameters.*match no parameter"):
        qadapt.load(save(dense, cfg, tmp_path / "dense")).load_adapter("p", adapters["parameters"])


def test_targetable_layers_name_the_experts(world):
    _, models = world
    hf, folder, adapters = models["qwen3-30b-a3b"]
    m = qadapt.load(folder)
    layers = m.targetable_layers()
    assert "model.layers.1.mlp.experts.15.down_proj" in layers and "model.layers.0.mlp.gate" in layers
    assert layers.index("model.layers.0.mlp.gate") < layers.index("model.layers.0.mlp.experts.0.gate_proj")


def test_default_kernels_run_the_experts(world):
    """``qadapt.load(path)`` without options (tests/test_default_kernels.py): each expert slice of the merged GGUF
    tensor on the q8 kernels where they run, within that test's bound of the exact path (5% of the logit scale;
    observed ~1%). With q8 activations a token whose k-th and (k+1)-th experts nearly tie may route to the other,
    as in llama.cpp, which quantizes activations the same way."""
    from qadapt.quant import native

    d, _ = world
    path = d / "mixtral-8x7b.q8_0.gguf"
    fast, exact = qadapt.load(path, kernels="auto"), qadapt.load(path, kernels="exact")
    lib = native.library()
    if lib is not None and lib.simd:
        assert {e["expert_up"].path for e in fast.decoder.blocks[0].experts} == {"q8"}
    got, want = fast.logits(IDS), exact.logits(IDS)
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


def test_bitsandbytes_on_load_quantizes_each_expert(world, tmp_path):
    """nf4 on load (`quant="nf4"`): every expert and attention linear quantized by bitsandbytes, the router kept
    dense (as llama.cpp keeps `ffn_gate_inp`). Reference: transformers holding bitsandbytes' own
    quantize_4bit/dequantize_4bit of each of those weights; dequantize mode is that float32 model (1e-4), in place
    runs bitsandbytes' 4-bit kernel (tests/test_bnb.py bounds a layer within 3% of |x| @ |W|.T; logits here within
    5% of their scale, measured 0.4%). A layer shape bitsandbytes' CPU kernel cannot pack is refused by name."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    _, models = world
    hf, folder, adapters = models["mixtral-8x7b"]

    def dq(w):
        q, st = F.quantize_4bit(w.contiguous(), quant_type="nf4")
        return F.dequantize_4bit(q, st)

    ref = copy.deepcopy(hf)
    layers, n_exp, _, width = _experts(hf)
    with torch.no_grad():
        for blk in ref.model.layers:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                lin = getattr(blk.self_attn, p)
                lin.weight.copy_(dq(lin.weight))
            ex = blk.mlp.experts
            for e in range(n_exp):
                ex.gate_up_proj[e, :width] = dq(ex.gate_up_proj[e, :width])
                ex.gate_up_proj[e, width:] = dq(ex.gate_up_proj[e, width:])
                ex.down_proj[e] = dq(ex.down_proj[e])
        want = ref(IDS).logits
    m = qadapt.load(folder, quant="nf4", mode="dequantize")
    torch.testing.assert_close(m.logits(IDS), want, atol=1e-4, rtol=1e-5)
    fast = qadapt.load(folder, quant="nf4")
    assert type(fast.decoder.blocks[0].experts[0]["expert_down"]).__name__ == "BnbLinear"
    assert type(fast.decoder.blocks[0].linears["router"]).__name__ == "DenseLinear"
    assert float((fast.logits(IDS) - want).abs().max()) <= 0.05 * float(want.abs().max())
    fast.load_adapter("legacy", adapters["legacy"], activate=True)  # LoRA on nf4 experts
    assert float((fast.logits(IDS) - want).abs().max()) > 0.1
    with pytest.raises(UnsupportedError, match=r"layers\.0\.self_attn\.k_proj\.weight is 48 x 64: .*4-bit CPU kernel"):
        qadapt.load(models["qwen3-30b-a3b"][1], quant="nf4")


def test_xlora_on_the_attention_of_an_moe_base(world, tmp_path):
    """X-LoRA (tests/test_xlora.py's reference: PEFT's XLoraConfig in memory, the reference layout written from
    it) with LoRA experts on the attention of a Mixtral base: logits and scalings equal PEFT's."""
    from models import make_adapter
    from test_xlora import peft_xlora, write_reference_layout

    _, models = world
    hf, folder, _ = models["mixtral-8x7b"]
    loras = [make_adapter(hf, tmp_path / f"l{i}", 40 + i, b_scale=4, target_modules=t)
             for i, t in enumerate((["q_proj", "v_proj"], ["k_proj", "o_proj", "v_proj"]))]
    pm = peft_xlora(hf, loras, seed=30, xlora_depth=1, softmax_temperature=0.5)
    layout = write_reference_layout(pm, loras, tmp_path / "x", spaced=False)
    with torch.no_grad():
        want = pm(IDS).logits
        scalings = pm.get_latest_scalings()
    m = qadapt.load(folder, xlora=str(layout))
    got = m.logits(IDS)
    torch.testing.assert_close(m.xlora_scalings(), scalings[:, :, :1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        assert float((want - hf(IDS).logits).abs().max()) > 0.01
