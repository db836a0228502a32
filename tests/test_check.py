"""``check_ordering``: each rule on a small crafted ordering, and real PEFT adapters against tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import foundation_helpers as fh
from qadapt.check import check_ordering
from qadapt.errors import InputError
from qadapt.layer_maps import parse_layer_map

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
Q0, K0, V0 = (f"model.layers.0.self_attn.{n}_proj" for n in "qkv")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """config.json of a 3-block llama, hidden 32 (kv 16)."""
    return fh.save_config(fh.tiny_model("llama"), tmp_path_factory.mktemp("llama"))


def _ordering(tmp_path, **data) -> Path:
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"base_model_id": "org/m", "order": ["a"], **data}))
    return path


def codes(items):
    return [i.code for i in items]


def test_valid_ordering(tmp_path, llama):
    r = check_ordering(_ordering(tmp_path, layers={Q0: 0, V0: 1}), model=str(llama))
    assert r.valid and r.architecture == "llama" and r.warnings == []


@pytest.mark.parametrize(
    "layers, code, text",
    [
        ({Q0: 0, "model.layers.0.self_attn.q_prj": 1}, "unknown-layer", "did you mean `model.layers.0.self_attn.q_proj`"),
        ({Q0: 0, "model.layers.3.self_attn.q_proj": 1}, "layer-out-of-range", "block 3"),
        ({Q0: 0, K0: 0}, "layers-collide", "index 0"),
        ({Q0: 1, K0: 2}, "layers-start", "start at 1"),
        ({Q0: 0, K0: 2}, "layers-gap", "skip 1"),
    ],
)
def test_layer_problems(tmp_path, llama, layers, code, text):
    r = check_ordering(_ordering(tmp_path, layers=layers), model=str(llama))
    assert code in codes(r.problems)
    assert any(text in p.message for p in r.problems if p.code == code)


def test_order_differs_from_peft_enumeration_warns(tmp_path, llama):
    r = check_ordering(_ordering(tmp_path, layers={K0: 0, Q0: 1}), model=str(llama))
    assert r.valid and codes(r.warnings) == ["layers-order"]


def test_names_and_preloads(tmp_path):
    path = _ordering(tmp_path, order=["a", "", "a"], preload_adapters=[{"name": "p"}, {"adapter_model_id": "x"}])
    r = check_ordering(path, arch="llama")
    assert codes(r.problems) == ["empty-adapter-name", "duplicate-adapter-name", "preload-incomplete", "preload-incomplete"]


def test_every_problem_reported_at_once(tmp_path, llama):
    layers = {Q0: 1, "model.layers.9.mlp.up_proj": 1, "model.layers.0.attn.q": 5}
    r = check_ordering(_ordering(tmp_path, order=["a", "a"], layers=layers), model=str(llama))
    assert {"layers-collide", "layers-start", "layers-gap", "layer-out-of-range", "unknown-layer",
            "duplicate-adapter-name"} <= set(codes(r.problems))


def test_layer_unsupported_for_base_format(tmp_path, monkeypatch):
    import json as _json

    from qadapt import layer_maps

    table = _json.loads((layer_maps._tables_dir() / "llama.json").read_text())
    table["modules"][0]["formats"] = ["full"]
    only_full = parse_layer_map(table, "<test>")
    monkeypatch.setattr("qadapt.model_info.get_layer_map", lambda name: only_full)
    r = check_ordering(_ordering(tmp_path, layers={Q0: 0}), arch="llama", quant="Q4_K_M")
    assert codes(r.problems) == ["unsupported-layer"] and r.quant == "Q4_K" and "Q4_K llama" in r.problems[0].message
    assert check_ordering(_ordering(tmp_path, layers={Q0: 0}), arch="llama", quant="f16").valid


def test_structure_only_without_model(tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"order": ["a"], "layers": {"whatever": 0}}))
    r = check_ordering(path)
    assert r.valid and codes(r.warnings) == ["ordering-file", "no-model"]


def test_hub_id_offline_is_a_warning_not_a_failure(tmp_path):
    r = check_ordering(_ordering(tmp_path, base_model_id="HuggingFaceH4/zephyr-7b-beta", layers={Q0: 0}))
    assert r.valid and codes(r.warnings) == ["model-unavailable"] and "offline" in r.warnings[0].message


def test_gemma_ordering_is_unsupported():
    """The mistral.rs X-LoRA Gemma ordering: a clear unsupported-architecture problem, online or not."""
    path = fh.orderings_dir() / "xlora-gemma-paper-ordering.json"
    for kwargs in ({}, {"arch": "gemma"}):
        r = check_ordering(path, **kwargs)
        assert codes(r.problems) == ["unsupported-architecture"]
        msg = r.problems[0].message
        assert "`gemma`" in msg and all(a in msg for a in ("llama", "mistral", "mixtral", "phi3", "gemma2"))


def test_bad_quant_is_usage_error(tmp_path):
    with pytest.raises(InputError, match="--quant"):
        check_ordering(_ordering(tmp_path), arch="llama", quant="Q9_Z")


# ---------------------------------------------------------------------- adapters made with PEFT
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    good = fh.make_adapter(root / "good", r=4)
    cfg = json.loads((good / "adapter_config.json").read_text())
    (good / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other"}))
    return {
        "good": good,
        "wide": fh.make_adapter(root / "wide", r=4, model_overrides=dict(hidden_size=48)),
        "gpt2": fh.make_adapter(root / "gpt2", arch="gpt2", r=4, target_modules=["c_attn"]),
        "mlp": fh.make_adapter(root / "mlp", r=4, target_modules=["up_proj"]),
    }


def test_matching_adapter_passes(tmp_path, llama, adapters):
    """Reference: an adapter saved by PEFT ``save_pretrained`` on the same tiny llama."""
    r = check_ordering(_ordering(tmp_path), model=str(llama), adapters=[("a", str(adapters["good"]))])
    assert r.valid, r.problems
    assert codes(r.warnings) == ["adapter-base-model"]


def test_wrong_shape_adapter_names_layer_and_shapes(tmp_path, llama, adapters):
    """Reference: a PEFT adapter trained on a llama with hidden size 48 instead of 32."""
    r = check_ordering(_ordering(tmp_path), model=str(llama), adapters=[("a", str(adapters["wide"]))])
    shape = [p.message for p in r.problems if p.code == "adapter-shape"]
    assert len(shape) == 6 and Q0 in shape[0] and "(4, 48)" in shape[0] and "(4, 32)" in shape[0]


def test_adapter_targeting_nothing_fails(tmp_path, llama, adapters):
    r = check_ordering(_ordering(tmp_path), model=str(llama), adapters=[("a", str(adapters["gpt2"]))])
    assert "adapter-targets-nothing" in codes(r.problems) and "no effect" in str(r.problems[-1].message)


def test_adapter_module_missing_from_layers(tmp_path, llama, adapters):
    path = _ordering(tmp_path, layers={Q0: 0, V0: 1})
    r = check_ordering(path, model=str(llama), adapters=[("a", str(adapters["mlp"]))])
    missing = [p for p in r.problems if p.code == "adapter-not-in-layers"]
    assert len(missing) == 3 and "model.layers.0.mlp.up_proj" in missing[0].message


def test_adapter_model_id_subfolders_and_unreadable(tmp_path, llama, adapters):
    root = adapters["good"].parent
    r = check_ordering(_ordering(tmp_path, order=["good", "missing"]), model=str(llama), adapter_model_id=str(root))
    assert codes(r.problems) == ["adapter-unreadable"] and "missing" in r.problems[0].message


def test_unsupported_peft_features_and_rank_mismatch(tmp_path, llama, adapters):
    import shutil

    bad = shutil.copytree(adapters["good"], tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(layer_replication=[[0, 1]], target_parameters=["mlp.experts.gate_up_proj"], r=8)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = check_ordering(_ordering(tmp_path), model=str(llama), adapters=[("a", str(bad))])
    assert {"adapter-unsupported", "adapter-rank", "adapter-targets"} <= set(codes(r.problems))
    assert any("layer_replication" in p.message and "bad" in p.message for p in r.problems)
    assert any("target_parameters" in p.message and "match no parameter" in p.message for p in r.problems)
