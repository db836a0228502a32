"""Real checkpoints' configurations (tests/real_configs.py: every config.json field kept, sizes shrunk) against
transformers, from a transformers folder and from GGUF files written by llama.cpp's own converter.

References: transformers' modeling code (its rope scalings: llama3, linear, dynamic, yarn, longrope; explicit
head_dim, tied embeddings, qkv biases, sliding windows, partial rotary factors), llama.cpp's
convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 sdist, gguf-py's dequantization and name map.
Tolerance: logits within 1e-4 absolute (1e-5 relative) on logits of magnitude ~1: both sides compute in float32
on the same weights and differ only in summation order (measured <= 2e-6); a wrong rope frequency, scale,
window or bias moves them by 1e-2 or more. Greedy tokens: equal.
"""

from __future__ import annotations

import pytest
import torch

import qadapt
from real_configs import REAL, build, convert, dequantized_model, save

IDS = torch.tensor([[1, 17, 250, 31, 77, 5, 299, 120, 64, 3] * 4])  # 40 tokens: past every shrunk context
ARCH = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3", "phi3": "PHI3", "gemma2": "GEMMA2",
        "gemma3_text": "GEMMA3", "mixtral": "LLAMA", "qwen3_moe": "QWEN3MOE"}


def _ref(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("layout", ["real", "transformers5"])
@pytest.mark.parametrize("name", sorted(REAL))
def test_transformers_folder_matches_transformers(tmp_path, name, layout):
    """The checkpoint's own config.json layout (`rope_scaling`, `rope_theta`) and the one transformers 5 saves
    (`rope_parameters`) both load, with transformers' logits on a 40-token prompt and its greedy tokens with a
    KV cache (dynamic NTK and LongRoPE change frequencies as the sequence grows, as transformers does)."""
    cfg, hf = build(name)
    folder = save(hf, cfg, tmp_path / name, real_config_json=layout == "real")
    m = qadapt.load(folder)
    torch.testing.assert_close(m.logits(IDS), _ref(hf, IDS), atol=1e-4, rtol=1e-5)
    prompt = IDS[:, :20]  # 20 + 12 tokens: generation crosses dynamic NTK's 24 and LongRoPE's 16
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert m.generate(prompt[0].tolist(), max_new_tokens=12).token_ids == want[0, 20:].tolist()


@pytest.fixture(scope="module")
def converted(llama_root, tmp_path_factory):
    """Each shrunk checkpoint written to GGUF by llama.cpp's converter as F32, F16 and Q8_0 (one process)."""
    d = tmp_path_factory.mktemp("convert")
    models, jobs = {}, []
    for name in sorted(REAL):
        if name == "llama-dynamic-ntk":
            continue  # llama.cpp has no dynamic NTK: its converter writes no scaling (tested to be refused below)
        cfg, hf = build(name, seed=1)
        folder = save(hf, cfg, d / name)
        models[name] = (cfg, hf)
        for t in ("f32", "f16", "q8_0"):
            jobs.append((folder, d / f"{name}.{t}.gguf", t))
    convert(llama_root, jobs)
    return d, models


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", sorted(set(REAL) - {"llama-dynamic-ntk"}))
def test_converter_gguf_matches_transformers(converted, name, outtype):
    """qadapt on llama.cpp's converter output (its rope keys and rope_freqs / rope_factors tensors, q/k row
    order, tied output) against transformers with gguf-py's dequantization of the same file."""
    d, models = converted
    cfg, hf = models[name]
    path = d / f"{name}.{outtype}.gguf"
    ref = dequantized_model(hf, path, ARCH[cfg["model_type"]])
    m = qadapt.load(path)
    torch.testing.assert_close(m.logits(IDS), _ref(ref, IDS), atol=1e-4, rtol=1e-5)
    if outtype == "f32":  # the file holds the float32 weights themselves (the reference is the model's own)
        for (k, a), b in zip(ref.state_dict().items(), hf.state_dict().values()):
            if cfg["model_type"].startswith("gemma") and k.endswith("norm.weight"):
                torch.testing.assert_close(a, b, atol=1e-7, rtol=0)  # (w + 1) - 1: one float32 rounding
            else:
                assert torch.equal(a, b), k


def test_unsupported_rope_scaling_is_refused_by_name(tmp_path):
    from qadapt.errors import UnsupportedError

    cfg, hf = build("vicuna-7b-16k")
    cfg["rope_scaling"] = {"type": "mrope", "factor": 2.0}
    folder = save(hf, cfg, tmp_path / "m")
    with pytest.raises(UnsupportedError, match="rope_scaling type `mrope`"):
        qadapt.load(folder)


@pytest.mark.parametrize("name", sorted(REAL))
def test_qadapt_export_keeps_the_scaling(tmp_path, name):
    """qadapt's own GGUF writer (`qadapt quantize`, in-situ quantization) writes each scaling as llama.cpp's
    converter does and reads it back to transformers' logits; dynamic NTK, which GGUF cannot express, is refused."""
    from qadapt.errors import InputError
    from qadapt.models.gguf_export import export_gguf
    from qadapt.layer_maps import get_layer_map

    cfg, hf = build(name, seed=2)
    lm = get_layer_map(cfg["model_type"])
    if name == "llama-dynamic-ntk":
        with pytest.raises(InputError, match="dynamic NTK"):
            export_gguf(hf.state_dict(), cfg, lm, tmp_path / "m.gguf")
        return
    sd = hf.state_dict()
    if "num_experts_per_tok" in cfg:  # transformers 5 merges experts in memory; checkpoints hold one per expert
        from safetensors.torch import load_file

        sd = load_file(save(hf, cfg, tmp_path / "hf") / "model.safetensors")
    path = export_gguf(sd, cfg, lm, tmp_path / "m.gguf")
    torch.testing.assert_close(qadapt.load(path).logits(IDS), _ref(hf, IDS), atol=1e-4, rtol=1e-5)
