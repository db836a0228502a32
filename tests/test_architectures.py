"""Llama, Mistral, Phi-3, Qwen2, GPT-2 (and Qwen-1) from GGUF and from transformers checkpoints.

References:
- transformers' modeling code (``*ForCausalLM``) on the same weights: gguf-py's dequantization of
  the GGUF file's tensors (tests/models.py ``write_quantized``; FIELD-NOTES: transformers' own GGUF
  loader gives qwen2 an extra vocabulary row, so it is not used here), or the checkpoint itself;
- PEFT (``get_peft_model`` / ``PeftModel``) on those transformers models for adapters on every
  target module of the family's layer map (GPT-2 with ``fan_in_fan_out=True``, its Conv1D layout);
- gguf-py's ``quants.quantize`` + ``quants.dequantize`` for in-situ quantization;
- llama.cpp (llama-cpp-python) for Qwen-1, which transformers does not implement.

Tolerances (as tests/test_gguf_runtime.py): dequantize mode and full-precision checkpoints run the
same float32 maths in another summation order: 1e-4 absolute on logits of magnitude ~1-10 (observed:
exact or ~1e-7). In place, blockwise types dequantize to float32 (same bound, relative 1e-5 of the
logit range); int4-kernel types (Q4_0, Q4_1, Q4_K) run bf16 activations and scales: 25% of the
logit range, the argmax in >= 80% of positions.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import qadapt
from qadapt.errors import InputError, SourceError, UnsupportedError
from qadapt.layer_maps import get_layer_map

from device_marks import require
from models import qwen1_checkpoint, save_hf, save_tokenizer, tiny_arch, tokenizer_metadata, write_quantized

ARCHS = ["llama", "mistral", "phi3", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2"]


def _lm(arch: str) -> str:
    """The layer map of a transformers model type (Gemma 3's text model is `gemma3_text` there)."""
    return {"gemma3_text": "gemma3"}.get(arch, arch)
INT4_KERNEL = {"Q4_0", "Q4_1", "Q4_K"}
# 12 tokens pass Phi-3's original context of 8 (long LongRoPE factors) and Mistral's/Phi-3's windows;
# 6 tokens stay inside it (short factors)
IDS_LONG = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
IDS_SHORT = IDS_LONG[:, :6]


def _inplace_tol(qtype: str, ref: torch.Tensor) -> float:
    """The exact kernels: float32 maths on gguf-py's weights, every type (summation order only)."""
    return 1e-5 * float(ref.abs().max()) + 1e-4


def _check(got: torch.Tensor, want: torch.Tensor, mode: str, qtype: str) -> None:
    err = float((got - want).abs().max())
    tol = 1e-4 if mode == "dequantize" else _inplace_tol(qtype, want)
    assert err <= tol, f"{mode} {qtype}: max |diff| {err} > {tol}"


def _ref_logits(ref, ids) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids).logits


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Per (arch, base): the file or folder qadapt loads and the transformers reference model.

    base: ``gguf-F32`` / ``gguf-Q8_0`` / ``gguf-Q4_K`` (written by gguf-py's writer, llama.cpp's layout),
    ``hf`` / ``hf-sharded`` (save_pretrained), ``hf-Q8_0`` / ``hf-Q4_0`` (full checkpoint quantized on
    load: the reference holds gguf-py's quantize-then-dequantize of each linear).
    """
    root = tmp_path_factory.mktemp("arch")
    cache: dict = {}

    def get(arch: str, base: str):
        key = (arch, base)
        if key in cache:
            return cache[key]
        if base.startswith("gguf-"):
            qtype = base[5:]
            hf = tiny_arch(arch, seed=1, wide=qtype.endswith("_K"))
            path = root / f"{arch}-{qtype}.gguf"
            ref = write_quantized(hf, path, qtype, seed=2)
        else:
            hf = tiny_arch(arch, seed=1)
            folder = root / f"{arch}-hf{'-sharded' if base == 'hf-sharded' else ''}"
            path = folder if folder.exists() else save_hf(hf, folder, shard=base == "hf-sharded")
            ref = hf if base in ("hf", "hf-sharded") else insitu_reference(hf, base[3:])
        cache[key] = (path, ref)
        return cache[key]

    return get


def insitu_reference(hf, qtype: str):
    """The transformers model with each layer-map linear replaced by gguf-py's quantize-then-dequantize
    (Conv1D weights quantized in [out, in] rows, as qadapt runs them); embeddings stay full precision,
    so a tied output head is untied."""
    import gguf

    ref = copy.deepcopy(hf)
    lm = get_layer_map(hf.config.model_type)
    n = lm.normalise_hf_config(hf.config.to_dict())["num_hidden_layers"]
    t = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for r in lm.enumerate_modules(n):
            mod = ref.get_submodule(r.path)
            w = mod.weight.detach().float().numpy()
            w = w.T if r.spec.conv1d else w
            deq = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w), t), t))
            mod.weight = torch.nn.Parameter(deq.T.contiguous() if r.spec.conv1d else deq, requires_grad=False)
    return ref


# ------------------------------------------------------------------------------------------ base logits
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
def test_gguf_logits_match_transformers(zoo, arch, qtype):
    """Reference: transformers' modeling code with gguf-py-dequantized weights; both modes, short and
    long sequences (Phi-3: short and long LongRoPE factors, sliding window)."""
    path, ref = zoo(arch, f"gguf-{qtype}")
    for mode in ("dequantize", "inplace"):
        m = qadapt.load(path, mode=mode)
        assert m.architecture == ("llama" if arch == "mistral" else _lm(arch))  # Mistral GGUFs declare `llama`
        assert m.base_format == "gguf"
        for ids in (IDS_SHORT, IDS_LONG):
            _check(m.logits(ids), _ref_logits(ref, ids), mode, qtype)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("base", ["hf", "hf-sharded"])
def test_hf_checkpoint_logits_match_transformers(zoo, arch, base):
    """Reference: the same transformers model that wrote the checkpoint (one file, and sharded)."""
    path, ref = zoo(arch, base)
    if base == "hf-sharded":
        assert (path / "model.safetensors.index.json").is_file()
    m = qadapt.load(path)
    assert m.base_format == "full" and m.architecture == _lm(arch) and m.tokenizer is not None
    for ids in (IDS_SHORT, IDS_LONG):
        torch.testing.assert_close(m.logits(ids), _ref_logits(ref, ids), atol=1e-4, rtol=1e-5)
    g = m.generate("the cat", max_new_tokens=4)
    assert len(g.token_ids) <= 4


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_insitu_quantization_equals_gguf_py(zoo, arch, qtype):
    """Each quantized weight equals gguf-py's quantize-then-dequantize exactly; logits match transformers
    on those weights in both modes."""
    path, ref = zoo(arch, f"hf-{qtype}")
    lm = get_layer_map(_lm(arch))
    for mode in ("inplace", "dequantize"):
        m = qadapt.load(path, quant=qtype, mode=mode)
        assert m.base_format == "gguf" and m.base_format_quant == qtype
        for r in lm.enumerate_modules(m.config.num_hidden_layers):
            container, key = m._slot(r.path)
            layer = container[key] if isinstance(container, torch.nn.ModuleDict) else getattr(container, key)
            assert layer.qtype == qtype and (mode == "dequantize" or not layer.weight_is_dense)
            want = ref.get_submodule(r.path).weight.detach()
            want = want.T if r.spec.conv1d else want
            assert torch.equal(layer.dequantize(), want), r.path
        for ids in (IDS_SHORT, IDS_LONG):
            _check(m.logits(ids), _ref_logits(ref, ids), mode, qtype)


# ------------------------------------------------------------------------------------------ adapters
def _make_adapter(base, out, arch: str, seed: int):
    """PEFT adapter on every target module of the layer map (lm_head included), random non-zero A and B."""
    import peft

    targets = list(get_layer_map(_lm(arch)).target_names)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          fan_in_fan_out=arch == "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5)
    pm.save_pretrained(out)
    wrapped = {n.removeprefix("base_model.model.") for n, mod in pm.named_modules() if hasattr(mod, "lora_A")}
    return out, wrapped


def _peft_logits(ref, folder, ids) -> torch.Tensor:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(folder)).eval()
    with torch.no_grad():
        return pm(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("base", ["gguf-Q8_0", "hf", "hf-Q8_0"])
def test_adapter_on_every_target_matches_peft(zoo, tmp_path, arch, base):
    """Reference: PEFT with one adapter on every layer-map target (fused qkv_proj / gate_up_proj for
    Phi-3, Conv1D with fan_in_fan_out for GPT-2, lm_head) over the dequantized transformers model."""
    path, ref = zoo(arch, base)
    folder, wrapped = _make_adapter(ref, tmp_path / "a", arch, seed=7)
    lm = get_layer_map(_lm(arch))
    n = ref.config.num_hidden_layers if arch != "gpt2" else ref.config.n_layer
    assert wrapped == {r.path for r in lm.enumerate_modules(n)}  # PEFT wrapped exactly the table's modules
    quant = base[3:] if base.startswith("hf-") else None
    qtype = base.split("-", 1)[1] if "-" in base else "F32"
    want = _peft_logits(ref, folder, IDS_LONG)
    assert float((want - _ref_logits(ref, IDS_LONG)).abs().max()) > 1e-2  # the adapter matters
    for mode in ("dequantize", "inplace"):
        m = qadapt.load(path, mode=mode, quant=quant, adapters={"a": str(folder)})
        assert len(m.adapters["a"].factors) == len(wrapped)
        _check(m.logits(IDS_LONG), want, mode, qtype)


@pytest.mark.parametrize("where", ["triton", "cuda"])
@pytest.mark.parametrize("arch", ARCHS)
def test_device_path_matches_peft(zoo, tmp_path, arch, where):
    """Every family on the device path (GGUF Q8_0 blocks through the Triton kernels, the adapter in a slot, the
    KV cache there), a prompt and a decode step, against PEFT over the dequantized transformers model.
    ``triton``: the CPU interpreter, float32 tiles (the exact path's tolerance); ``cuda``: float16 tensor-core
    tiles, 2e-3 of the logit scale (tests/test_triton.py)."""
    kw = require(where)
    path, ref = zoo(arch, "gguf-Q8_0")
    folder, _ = _make_adapter(ref, tmp_path / "a", arch, seed=7)
    want = _peft_logits(ref, folder, IDS_LONG)
    m = qadapt.load(path, adapters={"a": str(folder)}, **kw)
    cache = m.new_cache(IDS_LONG.shape[1], batch=2)
    T = IDS_LONG.shape[1] - 1
    first = m.step(IDS_LONG[:, :T], torch.arange(T).expand(2, T), cache)
    last = m.step(IDS_LONG[:, T:], torch.full((2, 1), T), cache)
    tol = _inplace_tol("Q8_0", want) if where == "triton" else 2e-3 * float(want.abs().max())
    for got, pos in ((first, T - 1), (last, T)):
        err = float((got - want[:, pos]).abs().max())
        assert err <= tol, (pos, err, tol)


# ------------------------------------------------------------------------------------------ Qwen-1
@pytest.fixture(scope="module")
def qwen1(tmp_path_factory):
    """A random Qwen-1 checkpoint (config.json + safetensors) and its GGUF, written as llama.cpp's
    QwenModel converter does (c_attn fused with bias as attn_qkv, w1 -> ffn_up, w2 -> ffn_gate,
    feed_forward_length = config's intermediate_size, no q/k permutation: NEOX rope)."""
    from safetensors.torch import save_file

    from qadapt.models.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("qwen1")
    cfg, sd = qwen1_checkpoint(seed=3)
    folder = root / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    save_tokenizer(folder)
    gguf_path = export_gguf(sd, cfg, get_layer_map("qwen"), root / "qwen.gguf", "F32",
                            tokenizer=tokenizer_metadata(cfg["vocab_size"]), force=True)
    return folder, gguf_path


def test_qwen1_gguf_and_checkpoint_agree(qwen1):
    """The same Qwen-1 weights from GGUF and from the checkpoint give the same logits (1e-4, float32;
    both read by qadapt: the reference for Qwen-1's maths is llama.cpp, in the next test); in-situ Q8_0
    stays close (8-bit weights through two random blocks: within 10% of the logit range)."""
    folder, gguf_path = qwen1
    a = qadapt.load(gguf_path, mode="dequantize")
    b = qadapt.load(folder)
    assert a.architecture == b.architecture == "qwen" and b.tokenizer is not None
    torch.testing.assert_close(a.logits(IDS_LONG), b.logits(IDS_LONG), atol=1e-4, rtol=1e-5)
    q = qadapt.load(folder, quant="Q8_0", mode="dequantize")
    assert q.decoder.blocks[0].linears["qkv"].bias is not None  # c_attn keeps its bias
    want = b.logits(IDS_LONG)
    assert float((q.logits(IDS_LONG) - want).abs().max()) < 0.1 * float(want.abs().max())


def test_qwen1_matches_llama_cpp(qwen1):
    """Reference: llama.cpp (llama-cpp-python) on the same F32 GGUF, all-position logits. llama.cpp
    runs float32 weights with its own kernels (F32 KV cache requested): 1e-3 of the logit range."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                    "(pip install llama-cpp-python builds llama.cpp from source)")
    folder, gguf_path = qwen1
    ids = IDS_LONG[0].tolist()
    llm = llama_cpp.Llama(str(gguf_path), logits_all=True, n_ctx=64, n_batch=64, verbose=False,
                          type_k=0, type_v=0, n_threads=2)  # 0 = GGML_TYPE_F32
    llm.eval(ids)
    want = torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float32)
    for path in (gguf_path, folder):
        got = qadapt.load(path, mode="dequantize").logits(torch.tensor([ids]))[0]
        err = float((got - want).abs().max())
        assert err <= 1e-3 * float(want.abs().max()) + 1e-4, f"{path}: max |diff| {err}"


# ------------------------------------------------------------------------------------------ errors
def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedError, match=r"gemma.*supported: .*gpt2.*llama.*phi3.*qwen2"):
        qadapt.load(tmp_path)


def test_quant_errors(zoo, monkeypatch):
    path, _ = zoo("llama", "hf")
    with pytest.raises(UnsupportedError, match=r"Q4_K.*supported: .*Q8_0.*Q4_0"):
        qadapt.load(path, quant="Q4_K")
    with pytest.raises(UnsupportedError, match="Q4_K"):
        qadapt.load(path, quant="Q4_K_M")
    gguf_path, _ = zoo("llama", "gguf-Q8_0")
    with pytest.raises(InputError, match="GGUF file"):
        qadapt.load(gguf_path, quant="Q4_0")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceError, match="offline"):
        qadapt.load("qadapt-test-nobody/no-such-model")
