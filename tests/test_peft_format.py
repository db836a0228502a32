"""PEFT adapter format: target matching, rank/alpha/scale, weight files, safe loading.

Reference: PEFT 0.21.2 itself (``get_peft_model`` on tiny transformers models):
we must wrap exactly the modules PEFT wraps, with its ranks and scalings.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

import foundation_helpers as fh
from qadapt.adapters.peft_format import (
    LoraAdapterConfig, adapter_weight_shapes, find_adapter_weights, load_adapter_tensors, read_adapter_config,
)
from qadapt.errors import AdapterError, FormatError, InputError, QadaptError
from qadapt.layer_maps import get_layer_map

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LORA_FORMS = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "suffix": dict(target_modules=["self_attn.k_proj", "mlp.down_proj"]),
    "full-name": dict(target_modules=["model.layers.1.self_attn.o_proj", "up_proj"]),
    "regex": dict(target_modules=r".*\.layers\.[02]\..*(q_proj|up_proj)"),
    "all-linear": dict(target_modules="all-linear"),
    "exclude-list": dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.2.mlp.up_proj"]),
    "exclude-regex": dict(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.1\..*"),
    "layers-list": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2], layers_pattern="layers"),
    "layers-int": dict(target_modules=["v_proj", "lm_head"], layers_to_transform=1),
    "patterns": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=8, lora_alpha=16,
                     rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2}, alpha_pattern={"v_proj": 32}),
    "rslora": dict(target_modules=["q_proj", "gate_proj"], r=4, lora_alpha=8, use_rslora=True),
}


@pytest.mark.parametrize("form", LORA_FORMS)
def test_matching_rank_and_scale_equal_peft(form):
    """Reference: PEFT ``get_peft_model`` (wrapped set, ``lora_A[...].weight.shape``, ``scaling``)."""
    kwargs = LORA_FORMS[form]
    model = fh.tiny_model("llama")
    ours = LoraAdapterConfig.from_dict(json.loads(json.dumps(kwargs)))
    lm = get_layer_map("llama")
    paths = [m.path for m in lm.enumerate_modules(model.config.num_hidden_layers)]
    mine = [p for p in paths if ours.matches(p, lm)]
    theirs = fh.peft_wrapped(model, **kwargs)
    assert mine == list(theirs)
    for path, layer in theirs.items():
        r, _ = ours.rank_alpha(path)
        assert layer.lora_A["default"].weight.shape[0] == r, path
        assert math.isclose(ours.scale(path), layer.scaling["default"], rel_tol=1e-12), path


def test_all_linear_excludes_output_layer_like_peft():
    """Reference: PEFT ``_maybe_include_all_linear_layers`` drops ``get_output_embeddings()``."""
    cfg = LoraAdapterConfig(target_modules="all-linear")
    lm = get_layer_map("gpt2")
    assert not cfg.matches("lm_head", lm) and cfg.matches("transformer.h.0.attn.c_attn", lm)
    assert not cfg.matches("lm_head") and cfg.matches("anything.else")


def test_matching_without_layer_map_uses_path_rules_only():
    cfg = LoraAdapterConfig(target_modules=("q_proj",), modules_to_save=("lm_head",))
    assert cfg.matches("a.b.q_proj") and not cfg.matches("a.b.xq_proj") and cfg.matches("q_proj")
    assert not cfg.matches("lm_head.q_proj")  # under modules_to_save: PEFT never adapts it
    assert not cfg.matches("model.layers.0.self_attn.o_proj", get_layer_map("llama"))


def test_default_targets_when_config_has_none():
    """Reference: PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (llama: q_proj, v_proj)."""
    cfg = LoraAdapterConfig()
    lm = get_layer_map("llama")
    assert cfg.matches("model.layers.0.self_attn.v_proj", lm) and not cfg.matches("model.layers.0.mlp.up_proj", lm)


@pytest.mark.parametrize(
    "data, key",
    [({"r": "8"}, "`r`"), ({"r": True}, "`r`"), ({"target_modules": 3}, "`target_modules`"),
     ({"target_modules": ".*", "layers_to_transform": [0]}, "layers_to_transform"),
     ({"rank_pattern": {"q_proj": "x"}}, "rank_pattern.q_proj"), ({"target_modules": "(("}, "target_modules"),
     ({"r": 0}, "`r`")],
)
def test_bad_config_names_file_and_key(tmp_path, data, key):
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(FormatError) as e:
        read_adapter_config(tmp_path)
    assert "adapter_config.json" in str(e.value) and key in str(e.value)


def test_unknown_keys_ignored_and_unsupported_features(tmp_path):
    data = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "embed_tokens"], "use_dora": True, "bias": "all",
            "modules_to_save": ["lm_head"], "peft_type": "LORA", "some_new_peft_option": 1,
            "target_parameters": ["experts.gate_up_proj"], "layer_replication": [[0, 2]], "use_qalora": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    cfg = read_adapter_config(tmp_path)
    msgs = "\n".join(cfg.unsupported_features())
    for field in ("layer_replication", "use_qalora"):
        assert field in msgs
    # PEFT features qadapt applies (target_parameters: merged mixture-of-experts weights, tests/test_moe.py)
    for supported in ("use_dora", "modules_to_save", "`bias`", "embed_tokens", "target_parameters"):
        assert supported not in msgs
    assert str(tmp_path) in msgs
    loha = LoraAdapterConfig(peft_type="LOHA").unsupported_features()[0]
    assert loha.count("peft_type") == 1 and "convert_to_lora" in loha and "qadapt adapters convert" in loha
    assert LoraAdapterConfig(target_modules=("q_proj",)).unsupported_features() == []


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return fh.make_adapter(tmp_path_factory.mktemp("a") / "ad", r=4, target_modules=["q_proj", "v_proj"])


def test_shapes_from_header_and_tensors(adapter):
    """Reference: PEFT ``save_pretrained`` layout (``base_model.model.<module>.lora_A.weight``)."""
    assert find_adapter_weights(adapter).name == "adapter_model.safetensors"
    shapes = adapter_weight_shapes(adapter)
    assert shapes["model.layers.0.self_attn.q_proj"] == {"A": (4, 32), "B": (32, 4)}
    assert shapes["model.layers.2.self_attn.v_proj"] == {"A": (4, 32), "B": (16, 4)}
    tensors = load_adapter_tensors(adapter)
    a, b = tensors["model.layers.0.self_attn.q_proj"]
    assert a.dtype == torch.float32 and tuple(b.shape) == (32, 4)
    assert set(tensors) == set(shapes) and len(shapes) == 6


def test_named_infix_and_safetensors_wins(tmp_path, adapter):
    from safetensors.torch import save_file

    state = {"base_model.model.x.q_proj.lora_A.adapter_1.weight": torch.zeros(2, 8),
             "base_model.model.x.q_proj.lora_B.adapter_1.weight": torch.zeros(6, 2)}
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    torch.save({"other": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    assert adapter_weight_shapes(tmp_path) == {"x.q_proj": {"A": (2, 8), "B": (6, 2)}}


def test_bin_weights_load(tmp_path):
    fh.make_adapter(tmp_path, r=2, safe=False)
    assert find_adapter_weights(tmp_path).name == "adapter_model.bin"
    assert adapter_weight_shapes(tmp_path)["model.layers.1.self_attn.q_proj"] == {"A": (2, 32), "B": (32, 2)}


class _Evil:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    _Evil.marker = str(marker)
    torch.save({"base_model.model.q_proj.lora_A.weight": _Evil()}, tmp_path / "adapter_model.bin",
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    assert not marker.exists()
    for fn in (adapter_weight_shapes, load_adapter_tensors):
        with pytest.raises(QadaptError, match="adapter_model.bin"):
            fn(tmp_path)
    assert not marker.exists()


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_adapter_config(tmp_path / "nope")
    with pytest.raises(InputError, match="adapter_model.safetensors or adapter_model.bin"):
        find_adapter_weights(tmp_path)
    from safetensors.torch import save_file

    save_file({"base_model.model.m.lora_A.weight": torch.zeros(2, 4)}, str(tmp_path / "adapter_model.safetensors"))
    assert adapter_weight_shapes(tmp_path) == {"m": {"A": (2, 4)}}
    with pytest.raises(AdapterError, match="`m` has no lora_B"):
        load_adapter_tensors(tmp_path)
