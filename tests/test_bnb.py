"""bitsandbytes bases against transformers' own bitsandbytes integration and PEFT's bnb LoRA layers.

References: ``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``
on the same full-precision folder (quantize-on-load), the folder it saves (pre-quantized
checkpoints), ``bitsandbytes.functional`` dequantization, and PEFT's LoRA over that bnb model
(its ``lora.bnb.Linear4bit`` / ``Linear8bitLt`` wrappers).

Tolerances: qadapt runs the same bitsandbytes modules on the same quantized bytes and inputs,
so logits agree up to float32 summation order in the rest of the decoder: 1e-4 on logits of
magnitude ~1 (observed: ~1e-6). Dequantized weights are compared bit for bit. The whole file
is skipped where bitsandbytes does not import (it is optional: ``pip install 'qadapt[bnb]'``).
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="bitsandbytes is optional (pip install 'qadapt[bnb]') and not installed")

import qadapt  # noqa: E402
from qadapt.errors import UnsupportedError  # noqa: E402
from qadapt.quant.bnb import BnbLinear  # noqa: E402

from models import tiny_hf  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
TOL = 1e-4

#: quant name -> (qadapt.load kwargs, BitsAndBytesConfig kwargs)
CASES = {
    "nf4": ("nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)),
    "nf4-dq": ("nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)),
    "fp4": ("fp4", dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32)),
    "int8": ("int8", dict(load_in_8bit=True)),
}


@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp")
    tiny_hf("llama", seed=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_bnb(fp_folder):
    """transformers' bitsandbytes model of each case (cached)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cache = {}

    def get(case, fresh=False):
        if case not in cache or fresh:
            cache[case] = AutoModelForCausalLM.from_pretrained(
                fp_folder, quantization_config=BitsAndBytesConfig(**CASES[case][1]), device_map="cpu").eval()
        return cache[case]

    return get


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_layer_dequantize_is_bitsandbytes():
    """Reference: bitsandbytes.functional quantize_4bit/dequantize_4bit and int8_vectorwise_quant/dequant
    on the same weight; tolerance none (same functions, same inputs). The forward stays within
    bitsandbytes' own error of x @ W.T (bf16 CPU kernel / int8 activations: 3% of |x| @ |W|.T)."""
    import bitsandbytes.functional as F

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    for quant in ("nf4", "fp4"):
        for dq in (False, True):
            layer = BnbLinear.quantize(w, quant=quant, double_quant=dq)
            q, st = F.quantize_4bit(w, quant_type=quant, compress_statistics=dq)
            assert torch.equal(layer.dequantize(), F.dequantize_4bit(q, st))
            d = layer.dequantize()
            assert ((layer(x) - x @ d.T).abs() <= 0.03 * (x.abs() @ d.abs().T)).all()
    layer = BnbLinear.quantize(w, quant="int8")
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    assert torch.equal(layer.dequantize(), F.int8_vectorwise_dequant(cb, scb).float())


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_on_load_matches_transformers_bnb(fp_folder, hf_bnb, case):
    """Reference: transformers + BitsAndBytesConfig on the same folder (lm_head and embeddings stay dense
    in both); tolerance TOL (module doc)."""
    want = _logits(hf_bnb(case))
    m = qadapt.load(fp_folder, quant=CASES[case][0], double_quant=case == "nf4-dq")
    assert m.base_format == "bnb" and m.base_format_quant == CASES[case][0]
    assert float((m.logits(IDS) - want).abs().max()) <= TOL


@pytest.mark.parametrize("case", ["nf4-dq", "fp4", "int8"])
def test_prequantized_checkpoint_matches_transformers_bnb(hf_bnb, tmp_path, case):
    """A folder saved by transformers from its bnb model loads without re-quantizing (its bytes are
    used as they are: dequantize() equals bitsandbytes' dequantization of the saved tensors) and gives
    transformers' logits; dequantize mode equals transformers on those dequantized weights. Tolerance TOL."""
    ref = hf_bnb(case)
    ref.save_pretrained(tmp_path)
    m = qadapt.load(tmp_path)
    assert m.base_format == "bnb" and m.file_info["quant_config"]["quant_type"] == CASES[case][0]
    want = _logits(ref)
    assert float((m.logits(IDS) - want).abs().max()) <= TOL
    layer = m.decoder.blocks[1].linears["gate"]
    bnb_layer = ref.model.layers[1].mlp.gate_proj
    if case == "int8":
        import bitsandbytes.functional as F

        st = bnb_layer.state
        assert torch.equal(layer.dequantize(), F.int8_vectorwise_dequant(st.CB, st.SCB).float())
    dense = qadapt.load(tmp_path, mode="dequantize")
    plain = tiny_hf("llama", seed=3)
    with torch.no_grad():
        for i, blk in enumerate(dense.decoder.blocks):
            for role, lin in blk.linears.items():
                mod = dict(plain.model.layers[i].named_modules())[{"q": "self_attn.q_proj", "k": "self_attn.k_proj",
                                                                   "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                                                                   "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                                                                   "down": "mlp.down_proj"}[role]]
                mod.weight.copy_(lin.dequantize())
                assert torch.equal(lin.dequantize(), m.decoder.blocks[i].linears[role].dequantize())
    assert float((dense.logits(IDS) - _logits(plain)).abs().max()) <= TOL


@pytest.mark.parametrize("case", ["nf4", "int8"])
def test_lora_on_bnb_matches_peft_bnb_layers(fp_folder, hf_bnb, tmp_path, case):
    """Reference: PEFT's LoRA over transformers' bnb model (lora.bnb.Linear4bit / Linear8bitLt);
    the delta is float32 on the bitsandbytes output in both. Tolerance TOL."""
    import peft
    from peft import PeftModel

    base = tiny_hf("llama", seed=3)
    torch.manual_seed(6)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                   init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5)
    pm.save_pretrained(tmp_path / "ad")
    base_logits = _logits(hf_bnb(case))
    # a fresh bnb model: PEFT wraps it in place, and a used one carries bitsandbytes' CPU repacking
    ref = PeftModel.from_pretrained(hf_bnb(case, fresh=True), str(tmp_path / "ad")).eval()
    assert "bnb" in type(ref.base_model.model.model.layers[0].self_attn.q_proj).__module__
    want = _logits(ref)
    m = qadapt.load(fp_folder, quant=CASES[case][0], adapters={"a": str(tmp_path / "ad")})
    assert float((m.logits(IDS) - want).abs().max()) <= TOL
    assert float((want - base_logits).abs().max()) > 100 * TOL  # the adapter matters


def test_missing_bitsandbytes_is_a_clear_error(fp_folder, monkeypatch):
    """Without a usable bitsandbytes, quant='nf4' raises UnsupportedError naming the extra; full
    precision still loads."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UnsupportedError, match="qadapt\\[bnb\\]"):
        qadapt.load(fp_folder, quant="nf4")
    assert qadapt.load(fp_folder).base_format == "full"


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("case", ["nf4", "int8"])
def test_new_families_quantized_on_load_match_transformers_bnb(tmp_path, arch, case):
    """Qwen3 (q/k norms), Gemma 2 (sandwich norms, soft-capping) and Gemma 3 (local/global layers) through
    bitsandbytes on load: reference and tolerance as above. Wide shapes: bitsandbytes' 4-bit CPU kernel
    takes inputs in multiples of 64 and outputs in multiples of 32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from models import tiny_arch

    tiny_arch(arch, seed=3, wide=True).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**CASES[case][1]),
                                               device_map="cpu").eval()
    want = _logits(ref)
    m = qadapt.load(tmp_path, quant=CASES[case][0])
    assert m.base_format == "bnb"
    assert float((m.logits(IDS) - want).abs().max()) <= TOL * max(1.0, float(want.abs().max()))
