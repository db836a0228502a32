"""GGUF runtime (Llama, Mistral) against transformers' modeling code on gguf-py-dequantized weights.

Tolerances:
- dequantize mode: same float32 weights, same float32 maths; only the summation order of
  matmuls may differ, so logits agree to 1e-4 absolute on logits of magnitude ~1-100
  (we observe exact equality on this CPU).
- in place: generic types dequantize blockwise to float32 (same bound); types on torch's int4
  kernel run with bf16 activations and bf16 scales/zeros (8-bit mantissa, relative rounding
  2^-8 per factor), so logits agree to a few percent of their range and the argmax almost
  everywhere; see ``INPLACE_TOL``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qadapt
from qadapt.errors import FormatError, QadaptError, UnsupportedError

from models import int4_logit_tol, tiny_hf, write_quantized

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
BLOCK256 = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
ALL = QUANTIZABLE + BLOCK256 + ["IQ4_NL"]
INT4_KERNEL = {"Q4_0", "Q4_1", "Q4_K"}


def _inplace_tol(qtype: str, ref: torch.Tensor) -> float:
    """int4-kernel types: models.int4_logit_tol (bf16 inside torch's int4 kernel); the others float32 maths on
    gguf-py's weights, summation order only: 1e-5 of the scale."""
    scale = float(ref.abs().max())
    return int4_logit_tol(scale) if qtype in INT4_KERNEL else 1e-5 * scale + 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One transformers model per (arch, size class); GGUFs written lazily per type."""
    out = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(arch: str, qtype: str):
        key = (arch, qtype)
        if key not in cache:
            wide = qtype in BLOCK256  # K-quant blocks hold 256 values: rows must be multiples of 256
            kw = dict(hidden_size=256, intermediate_size=512) if wide else {}
            if arch == "mistral":
                kw["sliding_window"] = 6  # shorter than the test sequences, so the window matters
            hf = tiny_hf(arch, seed=1, **kw)
            path = out / f"{arch}-{qtype}.gguf"
            ref = write_quantized(hf, path, qtype, seed=2)
            cache[key] = (path, ref)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("qtype", ALL)
def test_logits_match_transformers(models, arch, qtype):
    """Reference: transformers' LlamaForCausalLM / MistralForCausalLM with gguf-py-dequantized weights."""
    path, ref = models(arch, qtype)
    ids = torch.randint(0, ref.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    deq = qadapt.load(path, mode="dequantize").logits(ids)
    torch.testing.assert_close(deq, want, atol=1e-4, rtol=1e-5)
    inplace = qadapt.load(path, mode="inplace")
    got = inplace.logits(ids)
    err = float((got - want).abs().max())
    assert err <= _inplace_tol(qtype, want), f"{qtype}: max |diff| {err} vs logits max {float(want.abs().max())}"
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree >= (0.9 if qtype in INT4_KERNEL else 1.0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_chunked_prefill_matches_transformers(models, arch, chunk):
    """A long cached prefill runs in chunks (``Decoder.prefill_chunk`` tokens, rows x positions), each
    attending to what the earlier ones cached; across the chunks (and Mistral's 6-token window) its
    last logits are transformers' on the whole sequence at once. Same float32 weights and maths:
    the 1e-4 of ``test_logits_match_transformers``."""
    path, ref = models(arch, "F32")
    ids = torch.randint(0, ref.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits[:, -1]
    m = qadapt.load(path, mode="dequantize")
    m.decoder.prefill_chunk = chunk
    with torch.inference_mode():
        out = m.decoder(ids, torch.arange(23).expand(2, 23), m.new_cache(24, batch=2), last_only=True)
    torch.testing.assert_close(out.logits[:, -1], want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_K"])
def test_greedy_generation_matches_transformers(models, arch, qtype):
    """Reference: transformers' greedy ``generate`` (its own KV cache) on the dequantized weights."""
    path, ref = models(arch, qtype)
    prompt = [1, 5, 9, 40, 41, 42, 7]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    got = qadapt.load(path, mode="dequantize").generate(prompt, max_new_tokens=12)
    # the exported tokenizer's EOS (id 0) may be generated by the random model: compare up to it
    n = len(got.token_ids)
    assert got.token_ids == want[:n]
    assert n == 12 or want[n] == 0


def test_transformers_gguf_loader_second_witness(models, tmp_path):
    """Second witness: transformers' own GGUF loader (it un-permutes q/k itself) on the same file."""
    from transformers import AutoModelForCausalLM

    for qtype in ("F32", "Q8_0"):
        path, _ = models("llama", qtype)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        ids = torch.randint(0, hf.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = hf(ids).logits
        got = qadapt.load(path, mode="dequantize").logits(ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_inplace_layers_hold_no_dense_weight(models, qtype):
    path, _ = models("llama", qtype)
    m = qadapt.load(path, mode="inplace")
    for blk in m.decoder.blocks:
        for role, lin in blk.linears.items():
            assert lin.qtype == qtype
            assert not lin.weight_is_dense, role
            big = [t for t in list(lin.parameters()) + list(lin.buffers())
                   if t.is_floating_point() and t.numel() >= lin.in_features * lin.out_features]
            assert not big, f"{role} holds a dense float tensor"
    dense = qadapt.load(path, mode="dequantize")
    assert m.memory_bytes() < 0.6 * dense.memory_bytes()


@pytest.mark.parametrize("kernels", ["exact", "q8"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_memory_bytes_counts_the_quantized_storage(models, qtype, kernels):
    """memory_bytes() against the file's own tensor bytes (gguf-py's reader): the in-place model holds the file's
    blocks (or their same-size 8-row repack with kernels="q8") and its norms as float32 (F32 in the file: the same
    bytes), nothing dense: measured 1.000 of the file. The exact kernels add torch's int4 copy beside the blocks
    for Q4_0 / Q4_K (4-bit codes and a bf16 scale and zero per group of 32: 5 bits a weight; measured 1.71x).
    A model that registered nothing (the old accounting: 1,280 bytes for a 128 KB model) fails at once."""
    import gguf

    path, _ = models("llama", qtype)
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
    m = qadapt.load(path, kernels=kernels)
    ratio = m.memory_bytes() / file_bytes
    if kernels == "exact" and qtype in ("Q4_0", "Q4_K"):
        assert 1.6 < ratio < 1.8, ratio  # the blocks plus the int4 kernel's packed copy
    else:
        assert 0.99 < ratio < 1.01, ratio


def test_streaming_stop_strings_and_seeded_sampling(models):
    path, _ = models("llama", "Q8_0")
    m = qadapt.load(path)
    full = m.generate("the cat sat", max_new_tokens=16)
    pieces = list(m.generate("the cat sat", max_new_tokens=16, stream=True))
    assert "".join(pieces) == full.text
    if len(full.text) > 3:
        stop = full.text[2:4]
        cut = m.generate("the cat sat", max_new_tokens=16, stop=[stop])
        assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
        assert "".join(m.generate("the cat sat", max_new_tokens=16, stop=[stop], stream=True)) == cut.text
    a = m.generate("hello", max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = m.generate("hello", max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids
    assert m.tokenizer.decode(m.tokenizer.encode("the cat")) == "the cat"


# ---------------------------------------------------------------------------------------- bad files
def _gguf_bytes(models) -> bytes:
    path, _ = models("llama", "Q8_0")
    return Path(path).read_bytes()


@pytest.mark.parametrize("case", ["empty", "not_gguf", "truncated_header", "truncated_data"])
def test_bad_files_raise_format_error(models, tmp_path, case):
    data = _gguf_bytes(models)
    p = tmp_path / f"{case}.gguf"
    p.write_bytes({"empty": b"", "not_gguf": b"PK\x03\x04" + data[4:200], "truncated_header": data[:300],
                   "truncated_data": data[: len(data) - 1000]}[case])
    with pytest.raises(FormatError) as e:
        qadapt.load(p)
    assert str(p) in str(e.value)


def test_unknown_architecture_and_inconsistent_shapes(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "gemma.gguf", "gemma")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedError, match="gemma.*supported: .*llama"):
        qadapt.load(tmp_path / "gemma.gguf")

    hf = tiny_hf("llama")
    cfg = hf.config.to_dict()
    from qadapt.models.gguf_export import export_gguf
    from qadapt.layer_maps import get_layer_map

    sd = dict(hf.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:64]
    export_gguf(sd, cfg, get_layer_map("llama"), tmp_path / "bad.gguf", "F32")
    with pytest.raises(FormatError, match=r"blk\.1\.ffn_up\.weight.*shape \[64, 64\].*\[128, 64\]"):
        qadapt.load(tmp_path / "bad.gguf")


def test_unsupported_tensor_type(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "i8.gguf", "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.int8))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UnsupportedError, match="token_embd.weight.*I8"):
        qadapt.load(tmp_path / "i8.gguf")


def test_api_argument_errors(models):
    path, _ = models("llama", "F32")
    with pytest.raises(QadaptError, match="mode"):
        qadapt.load(path, mode="fast")
    m = qadapt.load(path)
    with pytest.raises(QadaptError, match="token ids"):
        m.logits(torch.tensor([[10**6]]))
    with pytest.raises(QadaptError, match="temperature"):
        m.generate("hi", temperature=-1)


def test_hub_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(QadaptError, match="not in the local Hugging Face cache"):
        qadapt.load("someorg/some-model-GGUF", gguf_file="m.Q4_0.gguf")


def test_hub_gguf_from_local_cache(models, monkeypatch, tmp_path):
    """The real huggingface_hub download path, served from a pre-filled cache with HF_HUB_OFFLINE=1."""
    path, _ = models("llama", "Q8_0")
    commit = "a" * 40
    snap = tmp_path / "models--someorg--tiny-GGUF" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "tiny.Q8_0.gguf").write_bytes(Path(path).read_bytes())
    (tmp_path / "models--someorg--tiny-GGUF" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-GGUF" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    m = qadapt.load("someorg/tiny-GGUF", gguf_file="tiny.Q8_0.gguf")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(m.logits(ids), qadapt.load(path).logits(ids))


# ---------------------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qadapt", *args], capture_output=True, text=True, timeout=300)


def test_cli_run_json_and_inspect(models):
    path, _ = models("llama", "Q4_0")
    r = _cli("run", str(path), "-p", "the cat", "-n", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    api = qadapt.load(path).generate("the cat", max_new_tokens=6)
    assert out["token_ids"] == api.token_ids and out["text"] == api.text
    r = _cli("run", str(path), "-p", "the cat", "-n", "6", "--mode", "dequantize")
    assert r.returncode == 0 and r.stdout.strip() == qadapt.load(path, mode="dequantize").generate(
        "the cat", max_new_tokens=6).text.strip()
    r = _cli("inspect", str(path), "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["config"]["num_hidden_layers"] == 2
    assert {t["type"] for t in info["tensor_types"]} == {"Q4_0", "F32"}
    assert [t["name"] for t in info["targetable"]][:3] == ["q_proj", "k_proj", "v_proj"]
    r = _cli("inspect", str(path))
    assert "q_proj" in r.stdout and "Q4_0" in r.stdout


@pytest.mark.parametrize("content", [b"", b"hello world, not a model"])
def test_cli_bad_file_no_traceback(tmp_path, content):
    p = tmp_path / "x.gguf"
    p.write_bytes(content)
    r = _cli("run", str(p), "-p", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(p) in r.stderr
